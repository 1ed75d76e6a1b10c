"""ESamp's scheduler state against real SGLang request objects and a real (Hugging Face) tiny
model, without a server: what a server on these CPUs cannot reach — a decode batch larger than
the largest captured decode graph, the streams of SGLang's overlap scheduler on a GPU (in the
model of CUDA streams of tests/stream_sim.py), and a forward compiled by torch.compile."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from transformers import LlamaForCausalLM

from esamp_sgl.config import ESampConfig
from esamp_sgl.shard import GroupShard
from runtime_patch.scheduler_state import SchedulerState
from tests.stream_sim import StreamSim, on_cuda_branches


@pytest.fixture(scope="module")
def state(tiny_model_path) -> SchedulerState:
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    return SchedulerState(ESampConfig(init="random", decode_path="graph"), model, torch.device("cpu"),
                          str(tiny_model_path))


def _request(rid: str, beta: float, group: str = "g") -> Req:
    params = SamplingParams(max_new_tokens=8, custom_params={"esamp": {"beta": beta, "group": group}})
    return Req(rid, "", array("i", [1, 2, 3]), params)


@torch.no_grad()
def test_a_decode_batch_above_the_captured_graphs_takes_the_eager_form(state):
    state.begin_capture(4)  # SGLang captured decode graphs for up to 4 rows
    state.end_capture()
    assert state.graph_fits(4) and not state.graph_fits(8)
    with pytest.raises(ValueError, match="exceed"):  # what the graph form would have run into
        state.graph_rows.load([1.0] * 8, [0] * 8)
    state.begin_batch([_request(f"r{i}", 1.0) for i in range(8)])
    assert state.current is not None and state.current.mixing
    hidden = torch.randn(8, state.bank.d)
    mixed, h_hat, info = state.mix(torch.arange(8), hidden, None, torch.arange(8))
    assert mixed.shape == hidden.shape and not torch.equal(mixed, hidden) and all(info)
    state.end_batch()


def test_tp_ranks_slot_tables_expire_groups_on_the_agreed_clock(tiny_model_path):
    """Sharded groups need every TP rank's slot table to agree: their clock is the one broadcast
    when a new request looks for its slot, whatever each rank's own clock says meanwhile."""
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    agreed = iter([100.0, 100.5, 200.0])
    state = SchedulerState(ESampConfig(init="random", group_ttl=10.0), model, torch.device("cpu"),
                           str(tiny_model_path), shard=GroupShard(1, 2), all_reduce=lambda t: t,
                           agreed_clock=lambda: next(agreed))
    assert state.bank.num_slots == -(-state.cfg.max_groups // 2)
    for rid, group in (("a", "ga"), ("b", "gb")):
        state.begin_batch([_request(rid, 1.0, group)])
        state.end_batch()
        state.release(rid, 1)
    assert state.current is None and [state.requests, len(state.slots)] == [{}, 2]
    assert state.report()["groups_live"] == 2  # the agreed clock stands still between requests
    state.begin_batch([_request("c", 1.0, "gc")])  # at 200: ga and gb are 99.5+ s past their last use
    assert len(state.slots) == 1 and "gc" in state.slots
    assert state.current.bank_slot == GroupShard(1, 2).local_slots(state.current.slot)


@torch.no_grad()
def test_a_groups_life_under_the_overlap_schedulers_streams(tiny_model_path, monkeypatch):
    """SGLang 0.5.23's overlap scheduler on a GPU: the worker (and ESamp's state) built on the
    default stream; the loop — releasing finished requests, /server_info — on the schedule stream;
    each forward — ESamp's begin_batch, prompt warm-up, mix, end_batch — on the model runner's
    forward stream after ``forward_stream.wait_stream(schedule_stream)``; training on the lane's
    side stream. One slot: the second group takes the first one's (reset_slots) while the first
    one's training may still be queued. The state takes its CUDA branches. Every access must be
    ordered as CUDA would order it, and a decode forward must not make the host wait."""
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    as_on_cuda = on_cuda_branches(monkeypatch)
    with StreamSim(monkeypatch) as sim:
        sim.place(model.state_dict().values())
        state = as_on_cuda(SchedulerState(ESampConfig(init="random", max_groups=1, warmup_steps=2, staleness=1),
                                          model, torch.device("cpu"), str(tiny_model_path)))
        schedule, forward = torch.cuda.Stream(), torch.cuda.Stream()

        def run_forward(reqs: list[Req], prompt_len: int) -> None:
            forward.wait_stream(schedule)
            decode = prompt_len == 1
            torch.cuda.set_sync_debug_mode("error" if decode else "default")
            with torch.cuda.stream(forward):
                state.begin_batch(reqs)
                tokens = len(reqs) * prompt_len
                ids, hidden = torch.randint(0, 100, (tokens,)), torch.randn(tokens, state.bank.d)
                if prompt_len > 1:
                    state.warm_up(ids, hidden, None, [prompt_len] * len(reqs))
                state.mix(ids, hidden, None, torch.arange(prompt_len - 1, tokens, prompt_len))
                state.end_batch()
            torch.cuda.set_sync_debug_mode("default")

        with torch.cuda.stream(schedule):
            for group in ("ga", "gb"):
                reqs = [_request(f"{group}{i}", 1.0, group) for i in range(2)]
                run_forward(reqs, prompt_len=3)
                for step in range(4):
                    run_forward(reqs, prompt_len=1)
                    for req in reqs:
                        req.output_ids.append(1)
                    if step == 2:
                        state.report()  # /server_info while the group decodes
                for req in reqs:
                    state.release(req.rid, len(req.output_ids))
            report = state.report()
    assert sim.problems() == []
    assert report["groups_created"] == 2 and report["training_steps"] >= 8 and report["warmed_up_tokens"] > 0


def _tp_rank(tiny_model_path) -> SchedulerState:
    """A scheduler state as one rank of a TP group (its all-reduce is the identity)."""
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    return SchedulerState(ESampConfig(init="random"), model, torch.device("cpu"), str(tiny_model_path),
                          shard=GroupShard(0, 1), all_reduce=lambda t: t, agreed_clock=lambda: 0.0)


def _refused(*args, **kwargs):
    raise RuntimeError("out of memory")


@torch.no_grad()
@pytest.mark.parametrize("part", ["reset_slots", "submit"])
def test_a_tp_ranks_failure_in_its_own_lane_leaves_its_step_alone(tiny_model_path, monkeypatch, part):
    """A failure in a rank's own share of the work — the fresh slot of a new group (begin_batch),
    the rows queued for training after the all-reduce (mix) — must not turn the step plain on that
    rank alone: it would skip the step's collectives, or sample from other logits than its peers.
    It is counted, and the step's mixed rows stand."""
    state = _tp_rank(tiny_model_path)
    monkeypatch.setattr(state.lane, part, _refused)
    state.begin_batch([_request("r", 1.0)])
    assert state.current is not None and state.current.mixing
    hidden = torch.randn(1, state.bank.d)
    mixed, _, info = state.mix(torch.arange(1), hidden, None, torch.arange(1))
    assert not torch.equal(mixed, hidden) and info[0] is not None
    assert state.counters.hook_errors == 1
    state.end_batch()


def test_metrics_are_published_once_per_16_mixing_steps(state):
    """With --enable-metrics: once per 16 mixing steps, however many batches meanwhile mix
    nothing (a report walks the slot table and reads the lane: not on every batch)."""
    published: list[dict] = []
    state.metrics, state.counters.steps = SimpleNamespace(publish=published.append), 17
    for _ in range(3):  # batches whose rows mix nothing (seed-only requests, say): steps stay
        state.current = SimpleNamespace(mixing=False)
        state.end_batch()
    assert len(published) == 1 and published[0]["training_steps"] == state.bank.train_steps
    state.metrics = None


def test_a_compiled_forward_runs_the_logits_hook_eagerly(monkeypatch):
    """--enable-torch-compile compiles the model's forward, logits processor included: dynamo must
    not trace ESamp's step (it would guard on its per-step Python state and recompile)."""
    from runtime_patch import hooks

    monkeypatch.setattr(hooks, "_state", None)  # no ESamp step: the hook calls the processor
    traced: list[bool] = []

    def logits_processor_forward(processor, input_ids, hidden_states, lm_head, metadata):
        traced.append(torch.compiler.is_compiling())
        return hidden_states * 2

    @torch.compile(backend="eager")
    def model_forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return hooks.mix_before_lm_head(logits_processor_forward, None, None, hidden_states + 1, None, None) - 1

    torch.testing.assert_close(model_forward(torch.ones(3)), torch.full((3,), 3.0))
    assert traced == [False]
