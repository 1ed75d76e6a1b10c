"""ESamp's state inside one SGLang scheduler process: the bank, the lane, groups, requests.

Per batch, ``begin_batch`` turns ``batch.reqs`` into per-row β and slot (rebuilt every step
from the requests, so it cannot go stale as requests join and leave); ``mix`` runs between the
final norm and the LM head; ``release`` unpins a finished request's group.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from esamp_sgl import params as esamp_params
from esamp_sgl.base_distiller import load_base
from esamp_sgl.config import ESampConfig, scheduled_beta
from esamp_sgl.distiller import DistillerBank, RowGroups
from esamp_sgl.graph_rows import GraphRows
from esamp_sgl.lane import CudaStreamLane, DeferredLane
from esamp_sgl.latent_step import distill_and_mix, distill_and_mix_sharded
from esamp_sgl.mix import FLOAT_PASSES_ON, candidate_mask, contrast_above_floor_, contrast_candidates_, min_p_floor
from esamp_sgl.seeded import seeded_sample
from esamp_sgl.shard import GroupShard
from esamp_sgl.slots import NoFreeSlot, SlotTable
from esamp_sgl.transfer import to_device
from runtime_patch.metrics import metrics_if_enabled

logger = logging.getLogger(__name__)

TOKEN_KEY = "esamp_token"  # per-token customized_info key; summarized into meta_info["esamp"]
SEEDS_ATTR = "esamp_seeds"  # set on a batch's SamplingBatchInfo: per-row esamp.seed for the sampler
# Fault injection for tests (off unless the variable is set): the ESamp parts it names ("mix",
# "graph_step") raise in every step that has a row of a group whose name starts with
# FAULT_GROUP_PREFIX; "nonfinite" turns the training inputs of rows of groups named
# NONFINITE_GROUP_PREFIX... into NaN (their mix is computed first, from the real states);
# "held_part" makes the prediction of a TP rank that holds a fault-test group's row raise (a
# fault on that rank alone: the ranks must still meet in their all-reduce).
FAULTS_ENV = "ESAMP_SGL_TEST_FAULTS"
FAULT_GROUP_PREFIX = "esamp-test-fault"
NONFINITE_GROUP_PREFIX = "esamp-test-nonfinite"


@dataclass
class ExploringRequest:
    """A request that explores (β > 0: group and slot) or asked for seeded sampling, or both."""

    params: esamp_params.ExploreParams
    group: str | None
    slot: int  # -1: no group (β = 0)
    sampled: int = 0  # forwards that sampled a token of it so far (SGLang's output_ids lag by a
                      # step under the overlap scheduler)


@dataclass
class StepRows:
    """Per-row ESamp inputs of the batch being run (row i = batch.reqs[i]); None entries/-1 slots
    are rows that neither explore nor are seeded."""

    beta: torch.Tensor  # [N] fp32 on the model's device
    beta_host: list[float]  # the same, on the host: reporting it needs no device sync
    slot: list[int]  # the group's global slot; -1 where the row does not explore
    bank_slot: list[int]  # the slot in this rank's bank; -1 also where another TP rank holds the group
    warm_slot: list[int]  # the group's global slot where an extend of this row warms it up, else -1
    debug: list[bool]
    group: list[str | None]
    seed: list[int | None]
    top_k: list[int]  # SGLang's per-request top_k (TOP_K_ALL where unlimited), for the candidate mask
    owner: list[tuple[str, int] | None]  # (request id, ordinal of the token this row samples)

    @property
    def mixing(self) -> bool:
        return any(s >= 0 for s in self.slot)

    @property
    def warming(self) -> bool:
        return any(s >= 0 for s in self.warm_slot)


# Where ESamp's host time goes (report()["part_seconds"]). L(ĥ) of the post-filter is not a
# part: its rows ride in SGLang's own LM-head GEMM (forward time, not ESamp's hooks), except
# where a prefill's logprobs force a second pass ("amateur_second_pass").
PARTS = ("rows", "shallow_state", "distill_and_mix", "training", "candidate_mask", "reweight",
         "amateur_second_pass", "meta", "warm_up", "seeded", "hook_other")


@dataclass
class Counters:
    mixed_tokens: int = 0
    steps: int = 0
    graph_steps: int = 0  # mixing decode steps in graph form (replayed, or eager with decode path "graph")
    warmed_up_tokens: int = 0
    refused_no_slot: int = 0
    groups_created: int = 0
    hook_errors: int = 0  # exceptions contained in ESamp's hooks: that step ran plain
    post_stop_rows_dropped: int = 0  # training rows of requests that had already stopped
    amateur_second_pass: int = 0  # post-filter steps whose L(ĥ) took a second LM-head pass
    # Host wall time in ESamp's hooks vs in whole forward_batch_generation calls: ESamp's share
    # of the scheduler's work, measured in-process (robust to a noisy machine). On GPU it
    # measures launch time, not kernel time.
    esamp_seconds: float = 0.0
    forward_seconds: float = 0.0
    # esamp_seconds by part (PARTS), so a regression shows which part grew; "hook_other" is the
    # rest of the hooks' time (bookkeeping between the parts).
    part_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))


@dataclass
class SchedulerState:
    cfg: ESampConfig
    model: torch.nn.Module
    device: torch.device
    model_path: str
    dp_rank: int = 0  # the data-parallel rank this scheduler serves (reported per token)
    # Tensor parallelism: this rank's share of the groups, and the all-reduce over the TP group
    # that sums the ranks' predictions (required where shard.size > 1; esamp_sgl/shard.py).
    shard: GroupShard = field(default_factory=GroupShard)
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Under TP: TP rank 0's clock, broadcast. Sharded groups need every rank's slot table to make
    # the same choices, and a group's TTL run out on one rank's clock but not yet on another's
    # would hand out different slots. So the tables' clock is this time, taken (agree_on_time, a
    # collective) where every rank is at the same point: when a new request looks for its group's
    # slot (every rank sees the same new requests at the same step) and on /server_info; between
    # those it stands still.
    agreed_clock: Callable[[], float] | None = None
    bank: DistillerBank = field(init=False)
    lane: DeferredLane = field(init=False)
    slots: SlotTable = field(init=False)
    requests: dict[str, ExploringRequest] = field(default_factory=dict)
    current: StepRows | None = None
    counters: Counters = field(default_factory=Counters)
    # The decode step as SGLang's decode CUDA graph replays it: buffers at fixed addresses, made at
    # the first capture (sized for its largest batch) or, on an eager graph-form step, on demand.
    graph_rows: GraphRows | None = None
    capturing: bool = False  # inside a decode-graph capture: the logits hook records graph_step
    graph_captured: bool = False
    # Post-filter: ĥ rows the LM head projects beside h in the same pass (lm_head_rows), and
    # the amateur logits L(ĥ) that pass produced.
    _armed_h_hat: torch.Tensor | None = None
    head: tuple[Any, Any] | None = None  # (LogitsProcessor, lm_head) seen in the decode-graph capture
    _amateur: torch.Tensor | None = None
    _timing: str | None = None  # the part timed() is charging now

    def __post_init__(self) -> None:
        embed, norm = shallow_modules(self.model)
        self._embed, self._norm = embed, norm
        if self.cfg.source_layer is not None:
            capture_layer(self.model, self.cfg.source_layer)
        hidden = embed.weight.shape[1]
        if self.shard.size > 1 and self.all_reduce is None:
            raise ValueError("groups sharded over tensor-parallel ranks need the TP all-reduce")
        self.bank = DistillerBank(self.shard.slots_held(self.cfg.max_groups), hidden, self.cfg, device=self.device,
                                  **initial_weights(self.cfg, self.model, self.model_path))
        lane_cls = CudaStreamLane if self.device.type == "cuda" else DeferredLane
        self.lane = lane_cls(self.bank, self.cfg.staleness)
        self._agreed_now = 0.0
        self.slots = SlotTable(self.cfg.max_groups, ttl=self.cfg.group_ttl,
                               **({"clock": lambda: self._agreed_now} if self.agreed_clock else {}))
        self._metrics_published = 0  # the last block of 16 mixing steps published
        self.metrics = metrics_if_enabled([k for k, v in self.report().items() if isinstance(v, (int, float))])
        self._faults = frozenset(filter(None, os.environ.get(FAULTS_ENV, "").split(",")))

    @contextmanager
    def timed(self, part: str = "hook_other") -> Iterator[None]:
        """Host time in ESamp, charged to ``part``. Nests: the outermost call (a hook) adds to
        ``esamp_seconds``; an inner part's time is moved from its enclosing part to its own."""
        outer, self._timing = self._timing, part
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            parts = self.counters.part_seconds
            parts[part] += spent
            if outer is None:
                self.counters.esamp_seconds += spent
            else:
                parts[outer] -= spent
            self._timing = outer

    @contextmanager
    def contained(self, part: str) -> Iterator[None]:
        """Run an ESamp part of a hook so that no exception leaves it: it is logged and counted,
        and the rest of the step runs as plain SGLang (the caller checks ``self.current``).
        Nothing ESamp does may take the scheduler down."""
        try:
            yield
        except Exception:
            self.counters.hook_errors += 1
            self.current = None
            self._armed_h_hat = self._amateur = None
            logger.exception("ESamp: error in %s; this step's rows are served as plain SGLang", part)

    def inject_test_fault(self, part: str) -> None:
        """Raise where FAULTS_ENV names ``part`` and the step has a row of a fault-test group."""
        if part in self._faults and self.current is not None and any(
                g is not None and g.startswith(FAULT_GROUP_PREFIX) for g in self.current.group):
            raise RuntimeError(f"ESamp test fault in {part}")

    def agree_on_time(self) -> None:
        """Under TP, move the slot tables' clock to the agreed time: a collective, so every rank
        must call it at the same point."""
        if self.agreed_clock is not None:
            self._agreed_now = self.agreed_clock()

    def held_params(self, step: StepRows) -> tuple:
        """The weights this rank predicts its held rows from: none, so that the prediction raises,
        where FAULTS_ENV names "held_part" and the rank holds a row of a fault-test group."""
        if "held_part" in self._faults and self.all_reduce is not None and any(
                s >= 0 and g is not None and g.startswith(FAULT_GROUP_PREFIX) for s, g in zip(step.bank_slot, step.group)):
            return ()
        return self.lane.forward_params

    def rank_error(self, error: Exception) -> None:
        """An error in this TP rank's own share of a step (its groups' training, warm-up or
        prediction): counted and logged, and the step goes on, so that the ranks still meet in
        the step's all-reduce (esamp_sgl/latent_step.distill_and_mix_sharded)."""
        self.counters.hook_errors += 1
        logger.error("ESamp: error in this TP rank's share of a step; its groups' rows are served unmixed",
                     exc_info=error)

    @contextmanager
    def rank_local(self) -> Iterator[None]:
        """Work on this rank's own groups alone. Under TP an error in it is the rank's alone: were
        it to end the step there (``contained``), the other ranks would wait in the step's
        all-reduce for ever, so it goes to rank_error and the step goes on. Without TP it propagates."""
        if self.all_reduce is None:
            yield
            return
        try:
            yield
        except Exception as error:
            self.rank_error(error)

    def begin_lane_step(self) -> None:
        """The training the lane owes this step (this rank's groups: rank_local)."""
        with self.timed("training"), self.rank_local():
            self.lane.begin_step()

    def submit_training(self, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor, step: StepRows) -> None:
        """Queue the step's rows for training (this rank's groups: rank_local). Under TP a failure
        here must not change the rank's tokens: the step's mixed rows, already all-reduced, stand."""
        with self.timed("training"), self.rank_local():
            self.lane.submit(self.training_inputs(x, step.group), h, slot, step.owner)

    def training_inputs(self, x: torch.Tensor, groups: list) -> torch.Tensor:
        """``x`` as training receives it: unchanged, unless FAULTS_ENV names "nonfinite" and a
        row's group is a NONFINITE_GROUP_PREFIX one (then that row is NaN)."""
        if "nonfinite" not in self._faults:
            return x
        rows = [i for i, g in enumerate(groups) if g is not None and g.startswith(NONFINITE_GROUP_PREFIX)]
        if not rows:
            return x
        x = x.clone()
        x[rows] = float("nan")
        return x

    # --- per batch -----------------------------------------------------------------------------

    def begin_batch(self, reqs: list, chunked_req=None) -> None:
        """Resolve each row's β and slot; ``current`` stays None when no row explores.
        ``chunked_req``: the request whose prefill this batch computes only a chunk of."""
        rows = [self._row(req) for req in reqs]
        if not any(r is not None for r in rows):
            self.current = None
            return
        sampling = [r if r is not None and samples_now(req, chunked_req) else None for r, req in zip(rows, reqs)]
        betas = [scheduled_beta(r.params.beta, r.sampled, self.cfg.beta_halflife) if r else 0.0 for r in sampling]
        owner = [(req.rid, r.sampled) if r is not None and r.slot >= 0 else None for r, req in zip(sampling, reqs)]
        for r in sampling:
            if r is not None:
                r.sampled += 1
        slot = [r.slot if r else -1 for r in sampling]
        self.current = StepRows(
            beta=to_device(betas, torch.float32, self.device),
            beta_host=betas,
            slot=slot,
            bank_slot=self.shard.local_slots(slot),
            warm_slot=[r.slot if r is not None and self.cfg.warmup_steps else -1 for r in rows],
            debug=[bool(r and r.params.debug) for r in sampling],
            group=[r.group if r else None for r in sampling],
            seed=[r.params.seed if r else None for r in sampling],
            top_k=[req.sampling_params.top_k for req in reqs],
            owner=owner,
        )

    def end_batch(self) -> None:
        # Once per 16 mixing steps (a batch that mixes nothing does not count).
        if self.metrics is not None and self.counters.steps // 16 != self._metrics_published:
            self._metrics_published = self.counters.steps // 16
            self.metrics.publish(self.report())
        self.current = None

    def _row(self, req) -> ExploringRequest | None:
        sp = req.sampling_params
        if req.finished():
            return None
        known = self.requests.get(req.rid)
        if known is not None:
            return known
        params = esamp_params.parse(sp.custom_params, self.cfg.max_beta)
        # The n > 1 prefix warm-up (max_new_tokens = 0) samples nothing; it matters only to a
        # group that warms up on the prompt it computes.
        if sp.max_new_tokens == 0 and not (params.active and self.cfg.warmup_steps):
            return None
        if not params.active:
            if params.seed is None:
                return None
            self.requests[req.rid] = known = ExploringRequest(params, None, -1)
            return known
        group = params.group or req.rid
        self.agree_on_time()
        try:
            slot, fresh = self.slots.acquire(group)
        except NoFreeSlot:
            # Plain for the request's whole life (its seed still applies): were it to ask again
            # each step, a slot freed midway would mix only its later tokens.
            self.counters.refused_no_slot += 1
            logger.warning("ESamp: no free group slot for request %s; it samples plain", req.rid)
            self.requests[req.rid] = known = ExploringRequest(replace(params, beta=0.0), None, -1)
            return known
        if fresh:
            if (held := self.shard.local(slot)) >= 0:
                with self.rank_local():  # under TP the other ranks go on to this step's collectives
                    self.lane.reset_slots(to_device([held], torch.int64, self.device))
            self.counters.groups_created += 1
        self.requests[req.rid] = known = ExploringRequest(params, group, slot)
        return known

    def release(self, rid: str, produced: int) -> None:
        """A request finished or was aborted, having produced ``produced`` tokens: unpin its
        group (idempotent). Under SGLang's overlap scheduler the step after a request's last
        token still held its row (it finishes only when that step's result is processed): that
        row is taken out of the training jobs not yet started."""
        known = self.requests.pop(rid, None)
        if known is None:
            return
        if known.group is not None:
            self.counters.post_stop_rows_dropped += self.lane.drop_rows(
                lambda tag: tag[0] == rid and tag[1] >= produced)
            self.slots.release(known.group)

    # --- between the final norm and the LM head ------------------------------------------------

    def shallow_state(self, input_ids: torch.Tensor, aux_hidden_states, rows: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The distiller's input for ``rows`` (None: every row): the layer-0 input norm of the
        token embedding (source "embed", from the ids alone), or the residual the model captured
        ("layer:N"; SGLang passes a list of captured tensors, or one packed tensor)."""
        if self.cfg.source_layer is None:
            return self._norm(self._embed(input_ids if rows is None else input_ids.index_select(0, rows)))
        captured = aux_hidden_states[0] if isinstance(aux_hidden_states, (list, tuple)) else aux_hidden_states
        return captured if rows is None else captured.index_select(0, rows)

    def warm_up(self, input_ids: torch.Tensor, hidden: torch.Tensor, aux_hidden_states, extend_lens: list[int]) -> None:
        """Extend pass: every exploring request's group trains ``warmup_steps`` steps on the
        prompt states this pass computed for it (with the radix cache: the part of the prompt
        not cached yet — for n > 1, the prefix warm-up request computes it all), before the
        group's first sampled token."""
        step = self.current
        ends = torch.tensor(extend_lens).cumsum(0)
        rows, slots = [], []
        for i, slot in enumerate(step.warm_slot):
            if slot >= 0:
                rows.append(torch.arange(int(ends[i]) - extend_lens[i], int(ends[i])))
                slots.append(torch.full((extend_lens[i],), self.shard.local(slot), dtype=torch.int64))
        if not rows:
            return
        # Every rank computes the shallow state of every warming row (under TP the embedding is a
        # collective); each trains the groups it holds (the others' rows have bank slot −1).
        index = to_device(torch.cat(rows), torch.int64, hidden.device)
        x = self.shallow_state(input_ids, aux_hidden_states, index)
        with self.rank_local():
            self.lane.warm_up(x, hidden.index_select(0, index), torch.cat(slots))
        self.counters.warmed_up_tokens += len(index)

    def mix(self, input_ids: torch.Tensor, hidden: torch.Tensor, aux_hidden_states, rows: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Hidden states with the sampled ``rows`` mixed, ĥ of those rows, one info entry per row."""
        self.inject_test_fault("mix")
        step = self.current
        self.begin_lane_step()
        with self.timed("shallow_state"):
            x = self.shallow_state(input_ids, aux_hidden_states, rows)
        with self.timed("distill_and_mix"):
            h = hidden.index_select(0, rows)
            slot = torch.tensor(step.bank_slot, dtype=torch.int64)
            # The slot-grouped form is the CPU's (on CUDA the fused kernel gathers per row).
            groups = None if self.device.type == "cuda" else RowGroups.of(slot, self.device)
            bank_slot = to_device(slot.clamp_min(0), torch.int64, self.device)
            if self.all_reduce is None:
                h_mix, h_hat, novelty = distill_and_mix(self.lane.forward_params, x, h, bank_slot, step.beta,
                                                        self.cfg.mix, groups, start=self.bank.template)
            else:
                held = to_device([s >= 0 for s in step.bank_slot], torch.bool, self.device)
                h_mix, h_hat, novelty = distill_and_mix_sharded(self.held_params(step), x, h, bank_slot, held,
                                                                step.beta, self.all_reduce, self.cfg.mix, groups,
                                                                start=self.bank.template, on_error=self.rank_error)
            out = hidden.clone()
            out.index_copy_(0, rows, h_mix)
        self.submit_training(x, h, slot, step)
        self.counters.steps += 1
        return out, h_hat, self._token_info(step, x, h, h_hat, novelty)

    def post_filter(self, logits: torch.Tensor, amateur: torch.Tensor, sampling_info) -> torch.Tensor:
        """Post-filter mode: the base logits' own top-k/top-p/min-p pick the candidates, and the
        contrast (1+β)·L(h) − β·L(ĥ) reweights only those. Only the exploring rows (host-side β)
        are computed; they are written back into ``logits`` in place, rows with β = 0 untouched.
        ``amateur`` is consumed (the float-pass path writes the contrast into it)."""
        step = self.current
        exploring = [i for i, b in enumerate(step.beta_host) if b > 0]
        if not exploring:
            return logits
        every_row = len(exploring) == logits.shape[0]
        rows = None if every_row else to_device(exploring, torch.int64, logits.device)

        def of_rows(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        rank_filters = uses_rank_filters(sampling_info)
        float_passes = (not rank_filters and logits.device.type in FLOAT_PASSES_ON
                        and logits.dtype == amateur.dtype == torch.float32)
        with self.timed("candidate_mask"):
            base = of_rows(logits)
            min_p, temperature = of_rows(sampling_info.min_ps), of_rows(sampling_info.temperatures.view(-1))
            if float_passes:
                floor = min_p_floor(base, min_p, temperature)
            else:
                keep = candidate_mask(base, of_rows(sampling_info.top_ks), of_rows(sampling_info.top_ps), min_p,
                                      temperature, rank_filters=rank_filters,
                                      max_top_k=max(step.top_k[i] for i in exploring))
        with self.timed("reweight"):  # in place: into SGLang's logits, or into the rows' copy
            if float_passes:  # amateur (ESamp's own L(ĥ)) is consumed as scratch
                mixed = contrast_above_floor_(base, of_rows(amateur), of_rows(step.beta), floor)
            else:
                mixed = contrast_candidates_(base, of_rows(amateur), of_rows(step.beta), keep)
            return mixed if rows is None else logits.index_copy_(0, rows, mixed)

    # --- amateur logits L(ĥ) for the post-filter, in the LM head's own pass ------------------

    def arm_amateur(self, h_hat: torch.Tensor) -> None:
        """The next LM-head call of this forward projects ``h_hat`` beside the sampled rows."""
        self._armed_h_hat, self._amateur = h_hat, None

    def lm_head_rows(self, hidden_rows: int) -> torch.Tensor | None:
        """For the LM-head hook: the ĥ rows to append to a call with ``hidden_rows`` rows, once;
        None (and disarmed) if nothing is armed or the call is not the sampled rows' one."""
        armed, self._armed_h_hat = self._armed_h_hat, None
        return armed if armed is not None and armed.shape[0] == hidden_rows else None

    def keep_amateur(self, amateur: torch.Tensor) -> None:
        self._amateur = amateur

    def take_amateur(self) -> torch.Tensor | None:
        """L(ĥ) from this forward's LM-head pass (None where it did not run); disarms."""
        amateur, self._amateur, self._armed_h_hat = self._amateur, None, None
        return amateur

    # --- the decode step in graph form (esamp_sgl/graph_rows.py) ------------------------------
    # On GPU SGLang captures its decode forward, our logits hook included, into CUDA graphs: the
    # hook then records ``graph_step`` (begin_capture/end_capture bracket the capture), and every
    # replay is bracketed by ``before_replay`` / ``after_replay``. With ``--esamp-decode-path
    # graph`` the logits hook runs the same three eagerly on every decode step.
    # Verified on CPU (the server tests run with --esamp-decode-path graph; tests/test_graph_rows.py):
    # the sequence's results — mixed tokens equal argmax W·h_mix, β = 0 rows equal plain, training,
    # post-filter, meta — and that the step compiles as one graph without breaks (no host syncs).
    # Only a GPU can verify the capture itself, replays against buffers written between them, and
    # the side-stream lane's events (tests/gpu_checks.py: pytest skips them without CUDA, and
    # scripts/gpu_check.sh runs them on a bare GPU machine).

    def begin_capture(self, max_rows: int) -> None:
        """SGLang starts capturing (or warming up) a decode graph for batches of up to ``max_rows``."""
        if not self.graph_captured:  # the first capture: every graph shares these buffers
            self.graph_rows = GraphRows(max_rows, self.bank.d, self.device)
        self.graph_captured = self.capturing = True

    def end_capture(self) -> None:
        self.capturing = False

    def graph_fits(self, rows: int) -> bool:
        """Whether an eager decode step of ``rows`` rows can take the graph form: captured
        buffers cannot grow (SGLang runs a batch above its largest graph eagerly, and then so
        does ESamp, in the eager form); uncaptured ones grow on demand."""
        return not self.graph_captured or self.graph_rows.max_rows >= rows

    def graph_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, aux_hidden_states) -> torch.Tensor:
        """What the decode graph computes between the final norm and the LM head, for every row
        of the padded batch (each decode row samples): the final states to project. Post-filter
        mode arms the LM head to project the snapshot's ĥ in the same pass."""
        self.inject_test_fault("graph_step")
        with self.timed("shallow_state"):
            x = self.shallow_state(input_ids, aux_hidden_states)
        with self.timed("distill_and_mix"):
            # Inside a capture an error is everyone's (the same code on the same shapes): it raises.
            params = self.lane.forward_params if self.current is None else self.held_params(self.current)
            out = self.graph_rows.step(params, x, hidden, self.cfg.mix, mix=self.cfg.filter_mode == "pre",
                                       start=self.bank.template, reduce=self.all_reduce,
                                       on_error=None if self.capturing else self.rank_error)
        if self.cfg.filter_mode == "post":
            self.arm_amateur(self.graph_rows.h_hat[: hidden.shape[0]])
        return out

    def captured_output(self, output) -> None:
        """Inside a capture, after the logits processor: the graph's L(ĥ) rows, found again after
        each replay by the graph's batch size (the rows of the logits it is captured with)."""
        amateur = self.take_amateur()
        if amateur is not None and is_capturing(self.device):
            self.graph_rows.amateur_by_rows[output.next_token_logits.shape[0]] = amateur

    def before_replay(self, rows: int) -> None:
        """Before a decode graph replays for ``rows`` live rows: the training the lane owes this
        step, and this step's β and slot in the graph's buffers (β = 0 everywhere when no row
        explores, so the replay leaves every row as plain SGLang computes it)."""
        if not self.graph_captured and (self.graph_rows is None or self.graph_rows.max_rows < rows):
            self.graph_rows = GraphRows(rows, self.bank.d, self.device)  # eager graph form: sized on demand
        step = self.current
        if step is None or not step.mixing:
            self.graph_rows.clear()
            return
        self.begin_lane_step()
        self.graph_rows.load(step.beta_host, step.bank_slot)

    def after_replay(self, output, sampling_info, amateur: torch.Tensor | None, second_pass) -> Any:
        """After the replay, before sampling: queue the step's rows for training, post-filter
        (post mode: the graph left the logits unmixed and projected ĥ beside h; ``amateur`` is
        that L(ĥ), or None where only ``second_pass(ĥ)`` can compute it), per-token info into
        customized_info."""
        step = self.current
        if step is None or not step.mixing:
            return output
        n = len(step.slot)
        snap = self.graph_rows.rows(n)
        self.submit_training(snap.x, snap.h, torch.tensor(step.bank_slot, dtype=torch.int64), step)
        if self.cfg.filter_mode == "post":
            if amateur is None:
                self.counters.amateur_second_pass += 1
                with self.timed("amateur_second_pass"):
                    amateur = second_pass(snap.h_hat)
            output.next_token_logits = self.post_filter(output.next_token_logits, amateur[:n], sampling_info)
        self.counters.steps += 1
        self.counters.graph_steps += 1
        attach_token_info(output, self._token_info(step, snap.x, snap.h, snap.h_hat, snap.novelty))
        return output

    def _token_info(self, step: StepRows, x: torch.Tensor, h: torch.Tensor, h_hat: torch.Tensor,
                    novelty: torch.Tensor) -> list:
        with self.timed("meta"):
            return self._token_info_rows(step, x, h, h_hat, novelty)

    def _token_info_rows(self, step: StepRows, x: torch.Tensor, h: torch.Tensor, h_hat: torch.Tensor,
                         novelty: torch.Tensor) -> list:
        # On GPU the novelty reaches the host by a copy that does not wait for the device; SGLang
        # reads each entry (TokenInfo.copy) only after it has waited for the step's outputs.
        novelty_host = novelty.to("cpu", non_blocking=True) if novelty.is_cuda else novelty.clone()
        info: list[TokenInfo | None] = []
        for i, slot in enumerate(step.slot):
            if slot < 0:
                info.append(None)
                continue
            debug = ({"x": x[i].float().tolist(), "h": h[i].float().tolist(), "h_hat": h_hat[i].float().tolist()}
                     if step.debug[i] else None)
            info.append(TokenInfo(step.group[i], step.beta_host[i], novelty_host[i], self.dp_rank, debug))
            self.counters.mixed_tokens += 1
        return info

    # --- sampling -------------------------------------------------------------------------------

    def resample_seeded(self, ids: torch.Tensor, probs: torch.Tensor, sampling_info, positions: torch.Tensor) -> None:
        """Overwrite, in place, the sampled ids of rows whose request carries esamp.seed. The
        seeds travel on the batch's SamplingBatchInfo: SGLang may sample after the forward's
        hooks ended (grammar batches under the overlap scheduler). Seeded sampling reads the
        rows' positions on the host (a device sync): it is a pairing tool for benchmarks, not
        the exploring hot path."""
        seeds = getattr(sampling_info, SEEDS_ATTR, None)
        if seeds is None or probs.shape[0] != len(seeds):
            return
        rows = [i for i, seed in enumerate(seeds) if seed is not None]
        if not rows:
            return
        index = to_device(rows, torch.int64, probs.device)
        pos = positions.index_select(0, index).tolist()
        drawn = seeded_sample(probs.index_select(0, index), sampling_info.top_ks.index_select(0, index),
                              sampling_info.top_ps.index_select(0, index), sampling_info.min_ps.index_select(0, index),
                              [seeds[i] for i in rows], pos, rank_filters=uses_rank_filters(sampling_info))
        ids[index] = drawn.to(ids.dtype)

    # --- reporting ----------------------------------------------------------------------------

    def report(self) -> dict:
        self.slots.expire()
        return {
            "groups_live": len(self.slots),
            "requests_exploring": len(self.requests),
            "slots_evicted": self.slots.evictions,
            "slots_max": self.cfg.max_groups,
            "bank_slots": self.bank.num_slots,  # this rank's: ⌈slots_max / TP size⌉ (esamp_sgl/shard.py)
            "max_beta": self.cfg.max_beta,
            "training_steps": self.bank.train_steps,
            "distiller_resets": self.lane.resets(),
            "lane_lag": self.lane.lag,
            "mixed_tokens": self.counters.mixed_tokens,
            "graph_steps": self.counters.graph_steps,
            "warmed_up_tokens": self.counters.warmed_up_tokens,
            "refused_no_slot": self.counters.refused_no_slot,
            "groups_created": self.counters.groups_created,
            "hook_errors": self.counters.hook_errors,
            "post_stop_rows_dropped": self.counters.post_stop_rows_dropped,
            "amateur_second_pass": self.counters.amateur_second_pass,
            "esamp_seconds": round(self.counters.esamp_seconds, 6),
            "forward_seconds": round(self.counters.forward_seconds, 6),
            "part_seconds": {k: round(v, 6) for k, v in self.counters.part_seconds.items()},
            "config": asdict(self.cfg),  # the recipe served (what `bench quality --url` records)
        }


@dataclass(frozen=True)
class TokenInfo:
    """One mixed token's entry in SGLang's per-token ``customized_info``. SGLang 0.5.23 copies
    each entry with ``.copy()`` when it appends it to its request, after it has waited for the
    step's outputs: that is where the host-side novelty is read, and a plain dict comes out."""

    group: str | None
    beta: float
    novelty: torch.Tensor  # 0-d, on the host
    dp_rank: int
    debug: dict | None  # x (the shallow state), h and ĥ of the row, for esamp.debug

    def copy(self) -> dict:
        return {"group": self.group, "beta": self.beta, "novelty": float(self.novelty), "dp_rank": self.dp_rank,
                **(self.debug or {})}


def is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def attach_seeds(sampling_info, step: StepRows | None) -> None:
    """Per-row esamp.seed on the batch's SamplingBatchInfo, which SGLang hands to its sampler
    (a dataclass without slots in SGLang 0.5.23); None where no row is seeded."""
    if sampling_info is not None:
        seeds = step.seed if step is not None and any(s is not None for s in step.seed) else None
        setattr(sampling_info, SEEDS_ATTR, seeds)


def attach_token_info(output, token_info: list) -> None:
    """Per-row entries under TOKEN_KEY in the LogitsProcessorOutput's customized_info."""
    info = dict(output.customized_info or {})
    info[TOKEN_KEY] = token_info
    output.customized_info = info


def samples_now(req, chunked_req) -> bool:
    """Whether this forward samples a token of ``req``: not the n > 1 prefix warm-up
    (max_new_tokens = 0), not a non-final chunk of a chunked prefill (SGLang 0.5.23 marks it as
    the batch's ``chunked_req``; its ``inflight_middle_chunks`` is no guide, since under the
    overlap scheduler it still counts the previous chunk while the last one runs). Such
    forwards still compute prompt states to warm up on."""
    return req.sampling_params.max_new_tokens != 0 and req is not chunked_req


def filters_candidates(sampling_info) -> bool:
    """Whether any row of the batch uses top-k, top-p or min-p (SGLang's host flags)."""
    return bool(uses_rank_filters(sampling_info) or sampling_info.need_min_p_sampling)


def uses_rank_filters(sampling_info) -> bool:
    """Whether any row of the batch uses top-k or top-p (SGLang's host flags; no device sync)."""
    return bool(sampling_info.need_top_k_sampling or sampling_info.need_top_p_sampling)


def initial_weights(cfg: ESampConfig, model: torch.nn.Module, model_path: str) -> dict:
    """DistillerBank's ``base``/``mlp`` arguments for ``cfg.init`` (empty for random)."""
    if cfg.init == "base":
        return {"base": load_base(model_path, cfg)}
    if cfg.init == "svd":
        mlp = model.model.layers[-1].mlp
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2, dim=0)  # SGLang merges [gate; up]
        return {"mlp": {"gate_proj": gate, "up_proj": up, "down_proj": mlp.down_proj.weight.detach()}}
    return {}


def capture_layer(model: torch.nn.Module, layer: int) -> None:
    """Make the model hand the residual after decoder ``layer`` to the logits processor (SGLang's
    EAGLE3 capture, which speculative decoding would also use: serve refuses the two together)."""
    layers = len(model.model.layers)
    if not hasattr(model, "set_eagle3_layers_to_capture"):
        raise RuntimeError(f"ESamp source layer:{layer} needs a model that can capture a layer's residual "
                           f"(set_eagle3_layers_to_capture); {type(model).__name__} cannot. Use --esamp-source embed.")
    if not 0 <= layer <= layers - 2:
        raise RuntimeError(f"ESamp source layer:{layer}: the model has {layers} decoder layers; "
                           f"use a layer in 0..{layers - 2}")
    model.set_eagle3_layers_to_capture([layer])


def shallow_modules(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The token embedding and layer 0's input norm of a Llama-family model, or a clear error.
    (RMSNorm is scale-free, so a model that scales its embeddings before layer 0 — Gemma's
    √d — gives the same shallow state up to the norm's ε.)"""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(layers[0], "input_layernorm", None) if layers is not None and len(layers) else None
    if embed is None or norm is None:
        raise RuntimeError(
            f"ESamp needs a Llama-family model (model.embed_tokens, model.layers[0].input_layernorm); "
            f"{type(model).__name__} does not have them. Start without ESamp (--no-esamp).")
    return embed, norm
