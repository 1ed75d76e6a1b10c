"""A real SGLang server on CPU, started by `esamp-sgl serve`'s command: tiny model and SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import launch
from tests.server_helpers import post

PROMPTS = ["What is 7 + 5?", "Name a color of the sky.", "Write the word hello twice."]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def served(request, tiny_model_path, smollm2_path):
    path = tiny_model_path if request.param == "tiny" else smollm2_path
    for server in launch(path, f"server-{request.param}"):
        yield request.param, path, server


def generate(server, payload: dict) -> dict | list:
    return post(server, "/generate", payload).json()


def test_generates_the_requested_number_of_tokens(served):
    _, _, server = served
    out = generate(server, {"text": "Once upon a time", "sampling_params": {
        "max_new_tokens": 12, "temperature": 0.8, "ignore_eos": True}})
    assert out["meta_info"]["completion_tokens"] == 12
    assert isinstance(out["text"], str) and out["text"]


def test_shared_prefix_is_reused_from_the_radix_cache(served):
    _, _, server = served
    prefix = "You are a careful assistant. Count slowly and explain every step. " * 4
    first = generate(server, {"text": prefix + "First question.", "sampling_params": {"max_new_tokens": 2}})
    second = generate(server, {"text": prefix + "Second question.", "sampling_params": {"max_new_tokens": 2}})
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] // 2


def test_n_samples_through_native_and_openai_endpoints(served):
    _, _, server = served
    outs = generate(server, {"text": "Tell me a story.", "sampling_params": {
        "max_new_tokens": 6, "temperature": 1.0, "n": 3, "ignore_eos": True}})
    assert len(outs) == 3 and all(o["meta_info"]["completion_tokens"] == 6 for o in outs)
    resp = post(server, "/v1/completions", {
        "model": "default", "prompt": "Tell me a story.", "max_tokens": 6, "n": 3, "temperature": 1.0})
    assert len(resp.json()["choices"]) == 3


def test_greedy_matches_transformers_token_for_token(served):
    name, path, server = served
    if name != "smollm2":
        pytest.skip("greedy parity is checked on the real pretrained model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text).input_ids
        out = generate(server, {"input_ids": ids, "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
        with torch.no_grad():
            hf_ids = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        # Both stop at EOS; compare the tokens both produced (EOS included).
        n = min(len(out["output_ids"]), len(hf_ids))
        served_ids, hf_ids = out["output_ids"][:n], hf_ids[:n]
        assert n >= 8
        if served_ids == hf_ids:
            continue
        step = next(i for i, (a, b) in enumerate(zip(served_ids, hf_ids)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([ids + hf_ids[:step]])).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"{prompt!r} step {step}: served {served_ids} vs hf {hf_ids}"
