"""Small helpers for tests that talk to a real server over HTTP."""

from __future__ import annotations

from pathlib import Path

import requests
import torch
from safetensors import safe_open

from esamp_sgl.router_route import ROUTING_KEY

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
N_TOKENS = 16
GREEDY = {"temperature": 0, "max_new_tokens": N_TOKENS, "ignore_eos": True}


def explore(beta: float, **extra: object) -> dict:
    return {"custom_params": {"esamp": {"beta": beta, **extra}}}


def post(server, path: str, payload: dict, ok: bool = True):
    resp = requests.post(server.url + path, json=payload, timeout=300)
    if ok:
        assert resp.status_code == 200, resp.text
    return resp


def gen(server, text: str, **sampling) -> dict:
    return post(server, "/generate", {"text": text, "sampling_params": sampling}).json()


def complete_in_group(url: str, prompt: str, group: str, max_tokens: int, beta: float = 0.5) -> dict:
    """An exploring /v1/completions request of ``group`` with the group as its routing key, as
    README's curl example sends it through SGLang's router."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True,
            **explore(beta, group=group)}
    resp = requests.post(url + "/v1/completions", json=body, headers={ROUTING_KEY: group}, timeout=120)
    assert resp.status_code == 200, resp.text
    completion = resp.json()
    [summary] = completion["metadata"]["esamp"]
    assert summary["group"] == group and summary["tokens_mixed"] == max_tokens
    return completion


def esamp_stats(server) -> dict:
    return requests.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]["esamp"]


def lm_head_weight(path: Path) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"  # tied
        return f.get_tensor(name).float()


def all_esamp_stats(server) -> list[dict]:
    """ESamp's entry of every scheduler (one per data-parallel rank)."""
    return [s["esamp"] for s in requests.get(server.url + "/server_info", timeout=30).json()["internal_states"]]
