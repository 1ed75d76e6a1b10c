"""The GPU path checked on CPU against a model of CUDA streams and graphs (tests/stream_sim.py):
the GPU checks of tests/gpu_checks.py — the lane, decode steps, a captured decode step replayed —
run here with every cross-stream access and host sync checked, and the model is shown to catch
what those checks guard against: ordering on a stream remembered at build time instead of the
forward's, job inputs without ``record_stream``, a graph-form buffer a replay does not read."""

from __future__ import annotations

import pytest
import torch

from esamp_sgl.lane import CudaStreamLane
from tests import gpu_checks
from tests.stream_sim import StreamSim, on_cuda_branches


@pytest.fixture
def sim(monkeypatch):
    with StreamSim(monkeypatch) as sim:
        yield sim


def test_a_read_on_another_stream_needs_a_wait(sim):
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(producer):
        written = torch.ones(4)
    with torch.cuda.stream(consumer):
        written.sum()
    assert len(sim.races) == 1 and "without waiting" in sim.races[0]

    producer.wait_stream(consumer)
    with torch.cuda.stream(producer):
        written.add_(1)
        done = torch.cuda.Event()
        done.record()
    with torch.cuda.stream(consumer):
        consumer.wait_event(done)
        written.sum()
    with torch.cuda.stream(producer):
        written.mul_(2)  # overwrites what consumer may still be reading
    assert len(sim.races) == 2 and "may still be reading" in sim.races[1]

    producer.wait_stream(consumer)
    with torch.cuda.stream(producer):
        written.mul_(2)
    torch.cuda.synchronize()
    with torch.cuda.stream(consumer):
        written.sum()
    assert len(sim.races) == 2


def test_waiting_on_an_event_never_recorded_orders_nothing(sim):
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(producer):
        written = torch.ones(4)
    consumer.wait_event(torch.cuda.Event())
    with torch.cuda.stream(consumer):
        written.sum()
    assert len(sim.races) == 1


@pytest.mark.parametrize("recorded", [False, True])
def test_a_block_freed_while_another_stream_reads_it(sim, recorded):
    side = torch.cuda.Stream()
    scratch = torch.ones(4)  # allocated on the default stream
    if recorded:
        scratch.record_stream(side)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scratch.sum()
    del scratch  # the default stream may reuse the block at once
    assert len(sim.races) == (0 if recorded else 1)
    assert recorded or "freed" in sim.races[0]


def test_host_memory_is_not_tracked_and_to_device_copies_on_the_current_stream(sim):
    from esamp_sgl import lane  # a module that copies to the device with esamp_sgl.transfer.to_device

    side = torch.cuda.Stream()
    slots = torch.tensor([0, 1, 2])  # host memory, and so is what host ops make of it
    with torch.cuda.stream(side):
        live = slots[slots >= 0].unique()
        on_device = lane.to_device(live, torch.int64, torch.device("cpu"))
    del slots, live
    assert sim.races == []
    on_device.sum()  # the default stream has not waited for the side stream's copy
    assert len(sim.races) == 1 and "host-to-device copy" in sim.races[0]


def test_host_syncs_in_sync_debug_mode(sim):
    on_device, host = torch.arange(4.0), torch.tensor([1.0, 2.0, 3.0, 4.0])
    int(on_device.sum())  # outside the mode: allowed
    torch.cuda.set_sync_debug_mode("error")
    on_device.copy_(host, non_blocking=True)  # from pinned memory on CUDA: no sync
    assert sim.syncs == []
    int(on_device.sum())
    on_device[on_device > 1]
    on_device + host
    host.tolist(), host.cpu()  # host memory: nothing to wait for
    on_device.tolist()
    on_device.cpu()
    torch.cuda.set_sync_debug_mode("default")
    assert [s.split()[0] for s in sim.syncs] == ["aten._local_scalar_dense.default", "aten.index.Tensor",
                                                 "aten.add.Tensor", "Tensor.tolist", "Tensor.cpu"]


def test_what_a_capture_refuses_or_leaves_out(sim):
    source, other = torch.ones(3), torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = source * 2
        with torch.cuda.stream(other):
            assert not torch.cuda.is_current_stream_capturing()
            eager = source * 3  # runs now: a replay does not repeat it
        torch.cuda.synchronize()
    source.fill_(5.0)
    graph.replay()
    assert captured.tolist() == [10.0] * 3 and eager.tolist() == [3.0] * 3
    assert [e.split()[0] for e in sim.capture_errors] == ["aten.mul.Tensor", "torch.cuda.synchronize"]


def test_host_memory_beside_device_memory_would_raise_on_cuda(sim):
    on_device, host = torch.arange(4.0), torch.tensor([1.0, 2.0, 3.0, 4.0])
    on_device.copy_(host)  # what CUDA allows: a copy, host indices, a 0-dim host scalar
    on_device[torch.tensor([0, 1])]
    on_device * torch.tensor(2.0)
    assert sim.mixed == []
    torch.where(on_device > 1, host, on_device)
    assert len(sim.mixed) == 1 and sim.mixed[0].startswith("aten.where.self")


def test_a_replay_runs_the_captured_kernels_on_the_tensors_they_had(sim):
    source, host_work = torch.ones(3), []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert torch.cuda.is_current_stream_capturing()
        doubled = source * 2
        host_work.append(1)  # Python runs once, at the capture
    source.fill_(5.0)
    graph.replay()
    assert doubled.tolist() == [10.0] * 3 and host_work == [1]
    source = torch.zeros(3)  # a new tensor: the graph still reads the old one
    graph.replay()
    assert doubled.tolist() == [10.0] * 3 and sim.races == [] and not torch.cuda.is_current_stream_capturing()


def _gpu_checks_on_cpu(monkeypatch) -> None:
    """tests/gpu_checks.py on CPU tensors, its scheduler states on their CUDA branches."""
    as_on_cuda, build = on_cuda_branches(monkeypatch), gpu_checks._state
    monkeypatch.setattr(gpu_checks, "_state", lambda *args, **kwargs: as_on_cuda(build(*args, **kwargs)))
    monkeypatch.setattr(gpu_checks, "CUDA", torch.device("cpu"))


def _lane_check(monkeypatch, staleness: int) -> None:
    _gpu_checks_on_cpu(monkeypatch)
    gpu_checks.check_lane_on_a_forward_stream(staleness)


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_the_lane_orders_every_access_against_the_forward_stream(sim, monkeypatch, staleness):
    _lane_check(monkeypatch, staleness)
    assert sim.problems() == []
    assert len(sim.streams) == 3  # default, the forward's, the lane's side stream


def test_a_lane_ordering_against_the_default_stream_races_the_forward(sim, monkeypatch):
    monkeypatch.setattr(CudaStreamLane, "_main", lambda lane: torch.cuda.default_stream())
    _lane_check(monkeypatch, 1)  # ops run eagerly here: its weights come out right, its order does not
    assert any("without waiting" in race for race in sim.races)


@pytest.mark.parametrize("form", ["eager", "graph"])
@pytest.mark.parametrize("sharded", [False, True], ids=["", "tp"])
def test_a_decode_step_on_a_forward_stream_with_the_side_stream_lane(sim, monkeypatch, form, sharded):
    """tests/gpu_checks.py's decode step (post-filter, bf16) through ESamp's scheduler state on its
    CUDA branches, training on the side-stream lane, the forward on a stream of its own."""
    _gpu_checks_on_cpu(monkeypatch)
    with torch.cuda.stream(torch.cuda.Stream()):
        gpu_checks.check_decode_step_makes_no_host_sync(form, sharded)
    assert sim.problems() == []
    side = sim.streams[-1]
    assert side.clock[side.id] > 100  # the steps' training ran there


def _captured_check(monkeypatch, filter_mode: str, sharded: bool) -> None:
    _gpu_checks_on_cpu(monkeypatch)
    gpu_checks.check_captured_decode_step_replays_padded(filter_mode, sharded)


@pytest.mark.parametrize("filter_mode", ["pre", "post"])
@pytest.mark.parametrize("sharded", [False, True], ids=["", "tp"])
def test_a_captured_decode_step_replays_padded(sim, monkeypatch, filter_mode, sharded):
    """tests/gpu_checks.py's captured decode step: captured through ESamp's capture hooks for 8
    rows, replayed for 3 and 5 with β, slots and weights changed between replays."""
    _captured_check(monkeypatch, filter_mode, sharded)
    assert sim.problems() == []


def test_a_graph_form_that_rebinds_a_buffer_fails_the_replay_check(sim, monkeypatch):
    from esamp_sgl.graph_rows import GraphRows

    load = GraphRows.load

    def load_into_a_new_tensor(rows, beta, slot):
        load(rows, beta, slot)
        captured, rows.beta = rows.beta, rows.beta.clone()
        captured.zero_()  # what the captured graph reads: β never reaches it

    monkeypatch.setattr(GraphRows, "load", load_into_a_new_tensor)
    with pytest.raises(AssertionError):
        _captured_check(monkeypatch, "pre", False)


def test_job_inputs_without_record_stream_are_freed_under_the_side_stream(monkeypatch):
    with StreamSim(monkeypatch, honour_record_stream=False) as sim:
        _lane_check(monkeypatch, 1)
    assert any("freed" in race for race in sim.races), sim.races[:3]


@pytest.mark.parametrize("staleness", [0, 1])
def test_the_lane_holds_where_record_stream_counts_as_a_write(monkeypatch, staleness):
    """The GPU check's CUDA-sanitizer runs meet whatever PyTorch the machine has; in some releases
    the sanitizer takes record_stream for a write on the current stream."""
    with StreamSim(monkeypatch, record_stream_writes=True) as sim:
        _lane_check(monkeypatch, staleness)
    assert sim.problems() == []


def test_an_error_tp_contains_still_fails_the_decode_step_check(sim, monkeypatch):
    """Under TP a rank's error is contained (counted, its rows served plain), and its training
    goes on; the GPU check must still fail on it, as on a sync that sync-debug mode raises."""
    from esamp_sgl import latent_step

    def sync_refused(*args, **kwargs):
        raise RuntimeError("called a synchronizing CUDA operation")

    _gpu_checks_on_cpu(monkeypatch)
    monkeypatch.setattr(latent_step, "predict", sync_refused)
    with pytest.raises(AssertionError), torch.cuda.stream(torch.cuda.Stream()):
        gpu_checks.check_decode_step_makes_no_host_sync("eager", sharded=True)


def test_a_report_reads_the_lanes_reset_count_without_waiting_for_the_device(sim):
    """/server_info and the metrics read how many distiller slots were reset; on CUDA each job
    copies the count to pinned host memory after its step, so a report never waits for the device."""
    from esamp_sgl.config import ESampConfig
    from esamp_sgl.distiller import DistillerBank

    bank = DistillerBank(2, 8, ESampConfig(init="random", rank=4, lr=0.1))
    lane = CudaStreamLane(bank, staleness=0)
    bank.device = torch.device("cuda")  # its CUDA branch: resets counted on the device, no sync
    x, h = torch.randn(4, 8), torch.randn(4, 8)
    x[0, 3] = float("nan")  # a row of slot 0
    lane.begin_step()
    lane.submit(x, h, torch.tensor([0, 1, 0, 1]))
    lane.flush()
    torch.cuda.set_sync_debug_mode("error")
    try:
        resets = lane.resets()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert resets == 1 and sim.problems() == []


def test_the_lane_leaves_a_side_stream_that_the_forward_runs_on(monkeypatch):
    """PyTorch's streams come from a round-robin pool: the stream SGLang runs the forward on,
    drawn after the lane was built, may be the lane's side stream. The lane then trains on
    another, with the jobs it had queued (on the default stream here) ordered and kept alive."""
    from esamp_sgl.config import ESampConfig
    from esamp_sgl.distiller import DistillerBank

    with StreamSim(monkeypatch, pool_size=2) as sim:
        lane = CudaStreamLane(DistillerBank(2, 8, ESampConfig(init="random", rank=4, lr=0.05)), staleness=1)
        torch.cuda.Stream()
        forward = torch.cuda.Stream()
        assert forward is lane.side  # the pool came round
        slot = torch.tensor([0, 1])
        lane.begin_step()
        lane.submit(torch.randn(2, 8), torch.randn(2, 8), slot)
        with torch.cuda.stream(forward):
            forward.wait_stream(torch.cuda.default_stream())
            for _ in range(3):
                lane.begin_step()
                lane.submit(torch.randn(2, 8), torch.randn(2, 8), slot)
                for _ in range(4):  # the forward's stream reuses freed blocks at once
                    torch.full((2, 8), float("nan"))
            lane.flush()
        torch.cuda.synchronize()
    assert lane.side is not forward and lane.bank.train_steps == 4
    assert sim.problems() == []
