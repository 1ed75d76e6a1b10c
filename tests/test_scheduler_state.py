"""ESamp's scheduler state against real SGLang request objects and a real (Hugging Face) tiny
model, without a server: what a server on these CPUs cannot reach — a decode batch larger than
the largest captured decode graph."""

from __future__ import annotations

from array import array

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams
from transformers import LlamaForCausalLM

from esamp_sgl.config import ESampConfig
from runtime_patch.scheduler_state import SchedulerState


@pytest.fixture(scope="module")
def state(tiny_model_path) -> SchedulerState:
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_path)).eval()
    return SchedulerState(ESampConfig(init="random", decode_path="graph"), model, torch.device("cpu"),
                          str(tiny_model_path))


def _request(rid: str, beta: float) -> Req:
    params = SamplingParams(max_new_tokens=8, custom_params={"esamp": {"beta": beta, "group": "g"}})
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
