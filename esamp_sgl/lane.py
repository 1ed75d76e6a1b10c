"""The training lane: decoding never waits for training, and staleness is exactly k.

Contract (both lanes): decode steps are numbered t = 0, 1, …; the training job of step t is the
(shallow, deep, slot) rows that step produced. The prediction at step t uses the weights after
jobs 0 … t−1−k have been applied, and no others. k = ``cfg.staleness``; fixed, so runs are
reproducible and tensor-parallel ranks apply identical updates.

- ``DeferredLane`` (CPU): jobs wait in a queue and are applied at the start of the step that
  first needs them — deterministic, and in the same thread as the forward (a background thread
  would share the two cores with the busy-polling scheduler and the forward; not adopted).
- ``CudaStreamLane`` (GPU): jobs run on a side stream against a master copy of the bank; the
  forward reads a published copy at fixed addresses (CUDA-graph safe). Before step t, the
  main stream waits for job t−1−k and publishes the slots it trained; job j starts only after
  the publish of step j+k, so it can never leak into an earlier step's weights. Written for
  CUDA: tests/gpu_checks.py holds it to the CPU twin's predictions on a GPU, and
  tests/test_stream_sim.py checks its stream ordering on CPU against a model of CUDA streams.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from esamp_sgl.distiller import DistillerBank
from esamp_sgl.transfer import to_device


@dataclass
class Job:
    step: int
    x: torch.Tensor
    h: torch.Tensor
    slot: torch.Tensor  # on the host (CPU): the bank groups rows by slot without a device sync
    owners: list | None = None  # a tag per row (the scheduler's (request id, token ordinal))
    ready: object | None = None  # CUDA: event recorded after the inputs were copied

    def read_on(self, stream: torch.cuda.Stream) -> None:
        """CUDA: ``stream`` reads x and h (record_stream: once freed, their memory goes to no other
        op before the work that stream had queued by then has run)."""
        self.x.record_stream(stream)
        self.h.record_stream(stream)


def distinct_stream(device: torch.device, avoid: list[torch.cuda.Stream]) -> torch.cuda.Stream:
    """A fresh CUDA stream that is none of ``avoid``. PyTorch hands out a fixed pool of streams
    round-robin (32 per priority and device), so a "new" one may be a stream SGLang already
    runs on (SGLang 0.5.23 redraws its own schedule stream for the same reason)."""
    taken = {stream.cuda_stream for stream in avoid}
    for _ in range(65):
        stream = torch.cuda.Stream(device)
        if stream.cuda_stream not in taken:
            return stream
    raise RuntimeError("no CUDA stream distinct from the forward's in PyTorch's pool")


class DeferredLane:
    def __init__(self, bank: DistillerBank, staleness: int) -> None:
        self.bank, self.staleness = bank, staleness
        self.step = -1  # the current decode step
        self._queue: deque[Job] = deque()

    def begin_step(self) -> int:
        """Call before the forward of a new decode step; applies the jobs it is owed."""
        self.step += 1
        self._apply_through(self.step - 1 - self.staleness)
        return self.step

    def submit(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor | list[int],
               owners: list | None = None) -> None:
        """Queue this step's rows for training. Copies now: the caller's buffers get reused.
        ``slot`` is the host-side per-row slot list of this step; ``owners`` optional per-row
        tags that ``drop_rows`` can match."""
        if self.step < 0:
            raise RuntimeError("submit() before begin_step()")
        slot_host = torch.tensor(slot, dtype=torch.int64) if isinstance(slot, list) else slot.detach().cpu().clone()
        self._queue.append(Job(self.step, x.detach().clone(), h.detach().clone(), slot_host, owners))

    def drop_rows(self, unwanted) -> int:
        """Take rows whose owner tag satisfies ``unwanted(tag)`` out of the jobs not yet started
        (their slot becomes −1); returns how many. A job already started keeps its rows."""
        dropped = 0
        for job in self._queue:
            for i, tag in enumerate(job.owners or ()):
                if tag is not None and job.slot[i] >= 0 and unwanted(tag):
                    job.slot[i] = -1
                    dropped += 1
        return dropped

    def flush(self) -> None:
        """Apply every queued job (e.g. when no decode step will follow)."""
        self._apply_through(self.step)

    def warm_up(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor) -> None:
        """Train on prompt states now, outside the staleness contract: a prefill is not a decode
        step and is never graph-captured, and the group's first sampled token should see it.
        Queued jobs land first, so the order of updates stays the order of the states."""
        self.flush()
        self.bank.warm_up(x, h, slot)

    @property
    def forward_params(self) -> tuple[torch.Tensor, ...]:
        """The weights the forward must read (with this lane, the bank's own)."""
        return self.bank.params

    def reset_slots(self, slots: torch.Tensor) -> None:
        """Fresh weights for ``slots``; queued jobs (of a previous group there) land first."""
        self.flush()
        self.bank.reset_slots(slots)

    @property
    def lag(self) -> int:
        """Queued jobs not yet applied."""
        return len(self._queue)

    def resets(self) -> int:
        """Distiller slots reset so far for non-finite weights (a host read, for reports)."""
        return int(self.bank.reset_count)

    def _apply_through(self, last: int) -> None:
        while self._queue and self._queue[0].step <= last:
            job = self._queue.popleft()
            self.bank.train_step(job.x, job.h, job.slot)


class CudaStreamLane(DeferredLane):
    """Same contract as DeferredLane; training runs on a side CUDA stream (see module doc).

    "Main" is the stream current at the moment of each call: the one SGLang runs the forward on
    (model_runner.forward_stream under the overlap scheduler, the scheduler's schedule stream
    without it), never a stream remembered when the lane was built. The side stream reads job
    tensors made on main: each is marked with ``record_stream`` so that the caching allocator
    does not hand its memory to main's next forward while the side stream still reads it.
    """

    def __init__(self, bank: DistillerBank, staleness: int) -> None:
        super().__init__(bank, staleness)
        self.side = torch.cuda.Stream(bank.device)  # never the forward's: see begin_step
        # Published: what the forward reads, at fixed addresses. The bank trains a master copy.
        self.published = tuple(p.clone() for p in bank.params)
        self._trained: dict[int, tuple[torch.cuda.Event, torch.Tensor]] = {}
        self._published_events: dict[int, torch.cuda.Event] = {}
        seen = torch.tensor(0, dtype=torch.int64)  # host memory (pinned on CUDA): see resets()
        self._resets_seen = seen.pin_memory() if bank.device.type == "cuda" else seen
        # The bank and these copies were written on the stream current now (SGLang builds the
        # worker on the default stream); the forward's stream and the side stream use them.
        torch.cuda.synchronize(bank.device)

    @property
    def forward_params(self) -> tuple[torch.Tensor, ...]:
        return self.published

    def resets(self) -> int:
        """As of the last training job the side stream ran: each job copies the count to pinned
        host memory after its step (without waiting, in the stream's order, after any warm-up
        on main), so a report never makes the host wait for the device."""
        return int(self._resets_seen)

    def _main(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.bank.device)

    def begin_step(self) -> int:
        if self._main().cuda_stream == self.side.cuda_stream:
            self._leave_the_forwards_stream()
        self.step += 1
        self._publish(self.step - 1 - self.staleness)
        published = torch.cuda.Event()
        published.record(self._main())
        self._published_events[self.step] = published
        self._launch_ready()
        oldest_gate = self._queue[0].step + self.staleness if self._queue else self.step
        self._published_events = {k: e for k, e in self._published_events.items() if k >= oldest_gate}
        return self.step

    def submit(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor | list[int],
               owners: list | None = None) -> None:
        super().submit(x, h, slot, owners)  # copies on main, ordered before main's next forward
        job = self._queue[-1]
        # The side stream reads them later. Marked before `ready` is recorded: record_stream is
        # in-place by its schema, and some releases of PyTorch's CUDA sanitizer count it as a write
        # on the current stream, which the side stream's read would then race.
        job.read_on(self.side)
        job.ready = torch.cuda.Event()
        job.ready.record(self._main())
        self._launch_ready()

    def flush(self) -> None:
        """Train every queued job now and publish everything trained; main then waits for the
        side stream as a whole, so no later write on main can race a job still running."""
        while self._queue:
            self._launch(self._queue.popleft(), gate=None)
        self._main().wait_stream(self.side)
        for step in sorted(self._trained):
            self._publish(step)

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)  # flush(): main is behind every side-stream job
        for pub, master in zip(self.published, self.bank.params):
            pub[slots] = master[slots]

    def warm_up(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor) -> None:
        super().warm_up(x, h, slot)  # flush() ordered main after the side stream; this trains on main
        live = to_device(torch.unique(slot[slot >= 0]), torch.int64, self.bank.device)
        for pub, master in zip(self.published, self.bank.params):
            pub[live] = master[live]

    def _leave_the_forwards_stream(self) -> None:
        """The side stream is the one the forward runs on (drawn from the pool after the lane was
        built): training would run in line with decoding. Move to another, after what the old
        one has queued, with the queued jobs' inputs marked as read there too."""
        old, self.side = self.side, distinct_stream(self.bank.device, [self._main()])
        self.side.wait_stream(old)
        for job in self._queue:
            job.read_on(self.side)

    def _publish(self, step: int) -> None:
        if step not in self._trained:
            return
        done, slots = self._trained.pop(step)
        main = self._main()
        main.wait_event(done)
        slots.record_stream(main)  # made on the side stream, read here
        for pub, master in zip(self.published, self.bank.params):
            pub[slots] = master[slots]

    def _launch_ready(self) -> None:
        while self._queue and self._queue[0].step + self.staleness in self._published_events:
            job = self._queue.popleft()
            self._launch(job, self._published_events[job.step + self.staleness])

    def _launch(self, job: Job, gate: torch.cuda.Event | None) -> None:
        with torch.cuda.stream(self.side):
            self.side.wait_event(job.ready)
            if gate is not None:
                self.side.wait_event(gate)
            self.bank.train_step(job.x, job.h, job.slot)
            self._resets_seen.copy_(self.bank.reset_count, non_blocking=True)
            live = to_device(torch.unique(job.slot[job.slot >= 0]), torch.int64, self.bank.device)
            done = torch.cuda.Event()
            done.record(self.side)
        self._trained[job.step] = (done, live)
