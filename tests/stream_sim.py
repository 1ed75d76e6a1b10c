"""CUDA streams and graphs modelled on CPU: a happens-before race detector for stream code.

The side-stream lane (esamp_sgl/lane.py) is only correct if every tensor one stream reads was
written by an op ordered before it — by program order on one stream, ``wait_event`` /
``wait_stream``, or a host synchronize — and if no block is freed (and so reusable at once by
its allocation stream) while another stream may still use it, unless ``record_stream`` told the
caching allocator so. A GPU shows a violation only as a rare wrong number. This module runs the
same code on CPU with ``torch.cuda``'s stream API replaced by a model of it, and records every
op's reads and writes per stream (a TorchDispatchMode, using each op's schema for what it
mutates) against vector clocks, as PyTorch's CUDA sanitizer does on a GPU. Ops execute eagerly;
what it reports is an ordering that CUDA would not guarantee.

Modelled: streams and their program order, events (record / wait; waiting on an event never
recorded is a no-op, as in CUDA), ``wait_stream``, ``torch.cuda.synchronize`` / stream and event
``synchronize``, the caching allocator's rule for frees (a freed block is reused by its
allocation stream without waiting for other streams, except those passed to ``record_stream``).
Every tensor is a CPU tensor here, so device memory is told from host memory by where it comes
from: what factory ops make, what ops on device memory make, and ``esamp_sgl.transfer.to_device``'s
copies (made on the current stream) are device memory; tensors made from Python data
(``torch.tensor``) and what ops on host memory alone make are host memory, which no stream runs
on.

Host syncs, as far as ops show them: inside ``torch.cuda.set_sync_debug_mode("error")`` (what
the GPU checks put around a decode step) ``sim.syncs`` lists each op that reads device memory
back to the host (``.item()``, ``nonzero``, boolean-mask indexing, ``unique``) and each device op
fed host memory other than by a non-blocking copy (a pageable host-to-device copy).

Device mismatches: ``sim.mixed`` lists each op given host memory (other than a 0-dim scalar)
beside device memory, which raises on CUDA, except a copy and indexing by host indices.

Graphs (``torch.cuda.graph`` / ``CUDAGraph``): the ops of a capture are recorded as kernels and
a replay runs them again on the same tensors, on the stream current then — so a replay reads what
those tensors hold at that moment, and a tensor rebound after the capture is never seen, as on a
GPU; Python runs once, at the capture. A host sync or a host-to-device copy inside a capture is
listed in ``sim.syncs``; a synchronize, or an op on a stream other than the capturing one (no
fork and join is modelled), in ``sim.capture_errors``.

``tolist()``, ``cpu()`` and ``numpy()`` run no op on CPU; they are watched directly and listed
when they read device memory. Not seen: ``.to(device)`` (every device is the CPU here, so a copy
to the host cannot be told from one to the device, and what a factory op makes counts as device
memory even where the code meant the host, as ``torch.randn`` with a CPU generator followed by
``.to(device)``: a pageable copy on CUDA), a graph reading memory freed after its capture (the
record keeps it alive), kernel timing; code that branches on ``device.type`` or ``is_cuda`` takes
its CPU branch unless told otherwise (``on_cuda_branches``).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from esamp_sgl import transfer

Clock = dict[int, int]  # stream id -> ops of that stream known to have completed

# Ops whose result the host must wait for when they read device memory.
HOST_READS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                        "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default",
                        "aten.repeat_interleave.Tensor"})


# Ops that CUDA lets take host memory beside device memory (a copy, or indices it copies over);
# any other op given both raises there ("Expected all tensors to be on the same device").
MIXED_DEVICES_ALLOWED = frozenset({"aten.copy_.default", "aten._to_copy.default", "aten.index.Tensor",
                                   "aten.index_put_.default", "aten._index_put_impl_.default"})


def _merge(into: Clock, other: Clock) -> None:
    for stream, count in other.items():
        into[stream] = max(into.get(stream, 0), count)


class SimStream:
    """A CUDA stream as far as ordering goes: its clock says which ops (of every stream) are
    ordered before its next op."""

    _ids = itertools.count(1)

    def __init__(self, sim: StreamSim, name: str) -> None:
        self.sim, self.id, self.name = sim, next(self._ids), name
        self.clock: Clock = dict(sim.host_clock)
        self.clock[self.id] = 0

    @property
    def cuda_stream(self) -> int:
        return self.id

    def tick(self) -> int:
        self.clock[self.id] += 1
        return self.clock[self.id]

    def ordered_before_next(self, stream: int, op: int) -> bool:
        return self.clock.get(stream, 0) >= op

    def wait_event(self, event: SimEvent) -> None:
        if event.clock is not None:
            _merge(self.clock, event.clock)

    def wait_stream(self, other: SimStream) -> None:
        _merge(self.clock, other.clock)

    def synchronize(self) -> None:
        self.sim.refuse_in_capture("a stream synchronize")
        _merge(self.sim.host_clock, self.clock)
        self.sim.order_after_host()

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class SimGraph:
    """torch.cuda.CUDAGraph as far as values go: the kernels recorded during capture, replayed on
    the same tensors (fixed addresses: what a replay reads is what those tensors hold then) on the
    stream current at the replay. Host work during the capture ran once, as on a GPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kernels: list[tuple[Any, tuple, dict, list[torch.Tensor]]] = []  # (op, args, kwargs, outputs)

    def replay(self) -> None:
        for func, args, kwargs, outputs in self.kernels:
            result = func(*args, **kwargs)
            for recorded, fresh in zip(outputs, _tensors(result)):
                recorded.copy_(fresh)


class SimEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.clock: Clock | None = None

    def record(self, stream: SimStream | None = None) -> None:
        stream = stream or StreamSim.active.current
        self.clock = dict(stream.clock)

    def synchronize(self) -> None:
        StreamSim.active.refuse_in_capture("an event synchronize")
        if self.clock is not None:
            _merge(StreamSim.active.host_clock, self.clock)
            StreamSim.active.order_after_host()


@dataclass
class _Accesses:
    """What the streams did to one storage since it was allocated."""

    allocated_on: SimStream
    allocated_by: str
    write: tuple[int, int, str] | None = None  # (stream id, its op number, op name)
    reads: dict[int, tuple[int, str]] = field(default_factory=dict)  # latest read per stream
    recorded: set[int] = field(default_factory=set)  # streams passed to record_stream
    in_graph_pool: bool = False  # a captured graph's memory: freed with the graph, not by a stream


class StreamSim(TorchDispatchMode):
    """Use as ``with StreamSim(monkeypatch) as sim:``; afterwards ``sim.races`` lists each
    access CUDA would not have ordered, and ``sim.problems()`` everything found (empty: none)."""

    active: StreamSim | None = None

    def __init__(self, monkeypatch: pytest.MonkeyPatch, honour_record_stream: bool = True,
                 record_stream_writes: bool = False, pool_size: int | None = None) -> None:
        """``record_stream_writes``: count ``record_stream`` as a write on the current stream, as
        some releases of PyTorch's CUDA sanitizer do (its schema is in-place). ``pool_size``:
        ``torch.cuda.Stream()`` hands out that many streams round-robin, as PyTorch's pool does
        (32 per priority); unset, every call makes a new one."""
        super().__init__()
        self.host_clock: Clock = {}
        self.streams: list[SimStream] = []
        self.default = self.new_stream("default")
        self.current = self.default
        self.races: list[str] = []
        self.syncs: list[str] = []
        self.mixed: list[str] = []  # ops that would raise on CUDA: host and device memory in one op
        self.capture_errors: list[str] = []  # what CUDA refuses, or leaves out of the graph, while capturing
        self._catch_syncs = False
        self._capturing: SimGraph | None = None
        self._capture_stream: SimStream | None = None
        self._accesses: dict[int, _Accesses] = {}
        self._finalizers: list[weakref.finalize] = []
        self._honour_record_stream = honour_record_stream
        self._record_stream_writes = record_stream_writes
        self._pool_size, self._pool, self._pool_draws = pool_size, [], 0
        self._patch(monkeypatch)

    def new_stream(self, name: str | None = None) -> SimStream:
        stream = SimStream(self, name or f"s{len(self.streams)}")
        self.streams.append(stream)
        return stream

    def pooled_stream(self) -> SimStream:
        """torch.cuda.Stream()."""
        self._pool_draws += 1
        if self._pool_size is None or len(self._pool) < self._pool_size:
            self._pool.append(self.new_stream())
            return self._pool[-1]
        return self._pool[(self._pool_draws - 1) % self._pool_size]

    def order_after_host(self) -> None:
        """After a host synchronize every stream's next op follows what the host waited for."""
        for stream in self.streams:
            _merge(stream.clock, self.host_clock)

    @contextlib.contextmanager
    def on(self, stream: SimStream) -> Iterator[SimStream]:
        previous, self.current = self.current, stream
        try:
            yield stream
        finally:
            self.current = previous

    def problems(self) -> list[str]:
        """Everything the model found: unordered accesses, host syncs (where caught), device
        mismatches, capture errors."""
        return self.races + self.syncs + self.mixed + self.capture_errors

    def refuse_in_capture(self, what: str) -> None:
        if self._capturing is not None:
            self.capture_errors.append(f"{what} while a graph is being captured (CUDA refuses it)")

    def synchronize(self, device: Any = None) -> None:
        self.refuse_in_capture("torch.cuda.synchronize")
        for stream in self.streams:
            _merge(self.host_clock, stream.clock)
        self.order_after_host()

    def record_stream(self, tensor: torch.Tensor, stream: SimStream) -> None:
        entry = self._accesses.get(id(tensor.untyped_storage()))
        if entry is not None and self._honour_record_stream:
            entry.recorded.add(stream.id)
        if entry is not None and self._record_stream_writes:
            self._access(tensor, self.current, self.current.tick(), "record_stream", write=True)

    def place(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors made before the model began (a model's weights, say) as device memory written on
        the current stream, as loading them onto the GPU would leave them."""
        for tensor in tensors:
            if id(tensor.untyped_storage()) not in self._accesses:
                self._register(tensor, self.current, self.current.tick(), f"loading {tuple(tensor.shape)}")

    def to_device(self, values: Any, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
        """esamp_sgl.transfer.to_device: a host-to-device copy queued on the current stream."""
        if self._capturing is not None:
            self.syncs.append("a host-to-device copy inside a graph capture "
                              "(replays copy what the host buffer holds then)")
        copy = torch.as_tensor(values, dtype=dtype).clone()
        self._register(copy, self.current, self.current.tick(), "a host-to-device copy")
        return copy

    @contextlib.contextmanager
    def graph(self, cuda_graph: SimGraph, pool: Any = None, stream: SimStream | None = None,
              capture_error_mode: str = "global") -> Iterator[SimGraph]:
        """torch.cuda.graph: synchronizes, then captures on its own stream."""
        self.synchronize()
        with self.on(stream or self.new_stream("capture")) as capture_stream:
            self._capturing, self._capture_stream = cuda_graph, capture_stream
            try:
                yield cuda_graph
            finally:
                self._capturing = self._capture_stream = None

    def set_sync_debug_mode(self, mode: int | str) -> None:
        self._catch_syncs = mode in (2, "error")

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sim = self
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: sim.pooled_stream())
        monkeypatch.setattr(torch.cuda, "Event", SimEvent)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.current)
        monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: sim.default)
        monkeypatch.setattr(torch.cuda, "stream", sim.on)
        monkeypatch.setattr(torch.cuda, "synchronize", sim.synchronize)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", sim.set_sync_debug_mode)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", SimGraph)
        monkeypatch.setattr(torch.cuda, "graph", sim.graph)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing",
                            lambda: sim._capturing is not None and sim.current is sim._capture_stream)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: sim.record_stream(tensor, stream))
        for method in ("tolist", "cpu", "numpy"):  # no op runs for them on CPU: seen here instead
            monkeypatch.setattr(torch.Tensor, method, sim._read_back(getattr(torch.Tensor, method), method))
        # ESamp's modules that copy to the device, imported first: one imported while the model is
        # on would keep the model's to_device after it is gone.
        importlib.import_module("runtime_patch.hooks")
        original = transfer.to_device
        for module in list(sys.modules.values()):  # transfer and every module that imported to_device
            if vars(module).get("to_device") is original:
                monkeypatch.setattr(module, "to_device", sim.to_device)

    def __enter__(self) -> StreamSim:
        StreamSim.active = self
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        StreamSim.active = None
        for finalizer in self._finalizers:  # storages that outlive the model no longer report to it
            finalizer.detach()

    # --- the accesses ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        values = {a.name: v for a, v in zip(schema.arguments, args)} | kwargs
        inputs = [(argument, tensor) for argument in schema.arguments for tensor in _tensors(values.get(argument.name))]
        tracked = [(argument, t) for argument, t in inputs if id(t.untyped_storage()) in self._accesses]
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        # host memory beside device memory (0-dim host tensors are scalars, which CUDA takes as such)
        on_host = [t for _, t in inputs if id(t.untyped_storage()) not in self._accesses and t.dim() > 0] \
            if tracked else []
        if self._catch_syncs and tracked:
            self._check_sync(func, [t for _, t in tracked], on_host, values)
        if on_host and str(func) not in MIXED_DEVICES_ALLOWED:
            self.mixed.append(f"{func} takes host memory {tuple(on_host[0].shape)} beside device memory")
        if inputs and not tracked or all(r.alias_info is not None for r in schema.returns) and not mutates:
            return out  # a host op (its results are host memory too), or a view: no kernel runs
        if self._capturing is not None:
            if self.current is self._capture_stream:
                self._capture(func, args, kwargs, out, tracked)
                return out
            self.capture_errors.append(f"{func} on {self.current} while {self._capture_stream} captures: it runs "
                                       f"now and is not in the graph (on the legacy default stream CUDA refuses it)")
        stream, name = self.current, str(func)
        op = stream.tick()
        for argument, tensor in tracked:
            written = argument.alias_info is not None and argument.alias_info.is_write
            self._access(tensor, stream, op, name, write=written)
        if any(r.alias_info is None for r in schema.returns):
            for tensor in _tensors(out):  # fresh storages: allocated (and written) on this stream
                if id(tensor.untyped_storage()) not in self._accesses:
                    self._register(tensor, stream, op, f"{name} {tuple(tensor.shape)}")
        return out

    def _capture(self, func: Any, args: tuple, kwargs: dict, out: Any, on_device: list) -> None:
        """A kernel recorded into the graph being captured: nothing reads or writes memory until a
        replay; what it allocates belongs to the graph's pool."""
        if str(func) in HOST_READS and on_device:
            self.syncs.append(f"{func} reads device memory back to the host inside a graph capture")
        fresh = _tensors(out) if any(r.alias_info is None for r in func._schema.returns) else []
        for tensor in fresh:
            if id(tensor.untyped_storage()) not in self._accesses:
                self._register(tensor, self.current, self.current.clock[self.current.id], f"{func} (graph pool)")
                self._accesses[id(tensor.untyped_storage())].in_graph_pool = True
        self._capturing.kernels.append((func, args, kwargs, fresh))

    def _check_sync(self, func: Any, on_device: list[torch.Tensor], on_host: list[torch.Tensor], values: dict) -> None:
        name = str(func)
        mask_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            t.dtype == torch.bool for t in _tensors(values.get("indices")))
        if name in HOST_READS or mask_index:
            self.syncs.append(f"{name} reads device memory {tuple(on_device[0].shape)} back to the host")
        if on_host and not (name == "aten.copy_.default" and values.get("non_blocking")):
            self.syncs.append(f"{name} takes host memory {tuple(on_host[0].shape)} (a pageable host-to-device copy)")

    def _read_back(self, method: Callable, name: str) -> Callable:
        """``Tensor.<name>`` (``tolist``, ``cpu``, ``numpy``) that lists its read of device memory
        back to the host, which on CUDA waits for the stream."""
        sim = self

        def reading(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if id(tensor.untyped_storage()) in sim._accesses:
                where = " inside a graph capture" if sim._capturing is not None else ""
                if where or sim._catch_syncs:
                    sim.syncs.append(f"Tensor.{name} reads device memory {tuple(tensor.shape)} back to the "
                                     f"host{where}")
            return method(tensor, *args, **kwargs)

        return reading

    def _register(self, tensor: torch.Tensor, stream: SimStream, op: int, made_by: str) -> None:
        """Device memory from here on: allocated on ``stream`` and written by its op ``op``."""
        storage = tensor.untyped_storage()
        self._accesses[id(storage)] = _Accesses(stream, made_by, write=(stream.id, op, made_by))
        self._finalizers.append(weakref.finalize(storage, self._freed, id(storage)))

    def _access(self, tensor: torch.Tensor, stream: SimStream, op: int, name: str, write: bool) -> None:
        entry = self._accesses[id(tensor.untyped_storage())]
        where = f"{name} on {stream} (tensor {tuple(tensor.shape)})"
        if entry.write is not None:
            by, at, what = entry.write
            if by != stream.id and not stream.ordered_before_next(by, at):
                self.races.append(f"{where} {'overwrites' if write else 'reads'} what {what} on "
                                  f"{self._name(by)} wrote, without waiting for it")
        if write:
            for by, (at, what) in entry.reads.items():
                if by != stream.id and not stream.ordered_before_next(by, at):
                    self.races.append(f"{where} overwrites what {what} on {self._name(by)} may still be reading")
            entry.write, entry.reads = (stream.id, op, name), {}
        else:
            entry.reads[stream.id] = (op, name)

    def _freed(self, key: int) -> None:
        """The caching allocator may hand the block to its allocation stream's next op at once."""
        entry = self._accesses.pop(key, None)
        if entry is None or entry.in_graph_pool:
            return
        owner = entry.allocated_on
        users = [entry.write] if entry.write else []
        users += [(by, at, what) for by, (at, what) in entry.reads.items()]
        for by, at, what in users:
            if by != owner.id and by not in entry.recorded and not owner.ordered_before_next(by, at):
                self.races.append(f"the block of {entry.allocated_by} on {owner} was freed while {what} on "
                                  f"{self._name(by)} may still use it (no record_stream, no wait)")

    def _name(self, stream_id: int) -> str:
        return next((repr(s) for s in self.streams if s.id == stream_id), f"<stream {stream_id}>")


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def on_cuda_branches(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Any]:
    """Make ESamp's scheduler state (runtime_patch.scheduler_state) take the branches it takes on
    CUDA: the side-stream lane, no host-side row grouping, device-side reset counting. Returns
    what turns a state built on the CPU into one that reports its device as CUDA (its own and
    its bank's; their tensors stay CPU tensors, which the model treats as device memory)."""
    from esamp_sgl.graph_rows import GraphRows
    from esamp_sgl.lane import CudaStreamLane
    from runtime_patch import scheduler_state

    monkeypatch.setattr(scheduler_state, "DeferredLane", CudaStreamLane)
    monkeypatch.setattr(scheduler_state, "GraphRows", lambda rows, d, device: GraphRows(rows, d, torch.device("cpu")))

    def as_on_cuda(state: Any) -> Any:
        state.device = state.bank.device = torch.device("cuda")
        return state

    return as_on_cuda
