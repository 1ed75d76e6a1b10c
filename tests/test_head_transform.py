"""L(ĥ) takes SGLang's own head transform: a tiny Gemma 2 (tied head, vocabulary 516 padded to
576 rows, final-logit softcapping c·tanh(W·h / c)) served with ESamp in post-filter mode.

Each returned logprob is checked against the formula recomputed from the token's h and ĥ: the
post-filter's contrast (1+β)·L(h) − β·L(ĥ) on the base's candidates with L = softcap ∘ W and
the vocabulary cut to its real size, and the pre-filter mix L(h_mix) where no filter applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import launch
from tests.server_helpers import N_TOKENS, PROMPTS, esamp_stats, explore, lm_head_weight, post

BETA = 2.0
TOP_K = 400  # most of the 516 tokens: the sampler's second top-k keeps every reweighted candidate


@dataclass(frozen=True)
class Head:
    W: torch.Tensor  # [V, d], V the real vocabulary
    cap: float

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh((self.W @ h) / self.cap)


@pytest.fixture(scope="module")
def server(tiny_gemma2_path):
    yield from launch(tiny_gemma2_path, "esamp-tiny-gemma2", "--esamp-init", "random", "--esamp-filter-mode", "post")


@pytest.fixture(scope="module")
def head(tiny_gemma2_path) -> Head:
    config = json.loads((tiny_gemma2_path / "config.json").read_text())
    W = lm_head_weight(tiny_gemma2_path)
    assert W.shape[0] == config["vocab_size"] and W.shape[0] % 64 != 0  # SGLang pads its LM head's rows
    return Head(W, config["final_logit_softcapping"])


def _steps(server, **sampling) -> list[tuple[float, int, torch.Tensor, torch.Tensor]]:
    body = {"text": PROMPTS[1], "return_logprob": True, "sampling_params": {
        "temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True, **sampling, **explore(BETA, debug=True)}}
    out = post(server, "/generate", body).json()
    steps = out["meta_info"]["esamp_debug"]
    assert len(steps) == N_TOKENS == out["meta_info"]["esamp"]["tokens_mixed"]
    return [(logprob, token, torch.tensor(s["h"]), torch.tensor(s["h_hat"]))
            for (logprob, token, _), s in zip(out["meta_info"]["output_token_logprobs"], steps)]


def _contrast(base: torch.Tensor, amateur: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(base, dtype=torch.bool).scatter(0, base.topk(TOP_K).indices, True)
    return torch.log_softmax(torch.where(keep, (1 + BETA) * base - BETA * amateur, float("-inf")), dim=-1)


def test_post_filter_contrasts_softcapped_logits_on_the_real_vocabulary(server, head):
    before = esamp_stats(server)["amateur_second_pass"]
    gap_to_uncapped = 0.0
    for logprob, token, h, h_hat in _steps(server, top_k=TOP_K):
        want = _contrast(head.logits(h), head.logits(h_hat))
        assert logprob == pytest.approx(want[token].item(), abs=2e-3)
        uncapped = _contrast(head.logits(h), head.W @ h_hat)  # the contrast without the amateur's softcap
        gap_to_uncapped = max(gap_to_uncapped, abs(uncapped[token].item() - logprob))
    assert gap_to_uncapped > 0.05  # the check tells the two apart
    assert esamp_stats(server)["amateur_second_pass"] == before  # L(ĥ) came from the LM head's own pass


def test_without_filters_the_mix_goes_through_the_softcap(server, head):
    for logprob, token, h, h_hat in _steps(server):
        want = torch.log_softmax(head.logits(h + BETA * (h - h_hat)), dim=-1)
        assert logprob == pytest.approx(want[token].item(), abs=2e-3)


def test_input_logprobs_take_the_second_pass_and_agree(server, head):
    """With input logprobs the prefill projects every prompt token: L(ĥ) of its sampled row then
    comes from a call of its own, through the same transform."""
    before = esamp_stats(server)["amateur_second_pass"]
    body = {"text": PROMPTS[0], "return_logprob": True, "logprob_start_len": 0, "sampling_params": {
        "temperature": 1.0, "max_new_tokens": 1, "top_k": TOP_K, **explore(BETA, debug=True)}}
    out = post(server, "/generate", body).json()
    (logprob, token, _), = out["meta_info"]["output_token_logprobs"]
    step = out["meta_info"]["esamp_debug"][0]
    want = _contrast(head.logits(torch.tensor(step["h"])), head.logits(torch.tensor(step["h_hat"])))
    assert logprob == pytest.approx(want[token].item(), abs=2e-3)
    assert esamp_stats(server)["amateur_second_pass"] == before + 1
