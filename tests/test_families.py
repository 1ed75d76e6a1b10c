"""The model families people serve, each as a tiny random checkpoint (``esamp-sgl models tiny
--arch A``) behind two real servers started side by side: plain (``--no-esamp``) and ESamp in
the default post-filter mode, whose requests take both of its paths — with top-k the base
logits' candidates are reweighted by L(ĥ) from the LM head's own pass, without any rank filter
the mixed h is sampled over the whole vocabulary (the pre-filter's path). Llama and Gemma 2 are
covered by the other server tests, and Mistral by Llama's (SGLang 0.5.23's MistralForCausalLM is
its LlamaForCausalLM; ``models tiny --arch mistral`` writes one). The families here add q/k/v
biases and tied heads (Qwen2), q/k norms (Qwen3), sparse MoE layers (Qwen3-MoE), and Gemma 3's
scaled embeddings, (1 + w) norms and sliding-window layers.

The distiller's source alternates between the embedding and a captured layer across families
(SOURCES; one server each keeps the suite's time in check). What the method means by its states
is checked against transformers for each: x (the layer-0 input norm of the token embedding, or
the residual after layer N) and h (the final norm's output) that the server reports per token
equal what the base distiller is trained on (esamp_sgl.base_distiller.shallow_and_deep_states)
at the same positions. Distillers start random: pre-training a base distiller per family costs
minutes of generation here, and what makes it right for a family is that check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esamp_sgl.base_distiller import shallow_and_deep_states
from esamp_sgl.config import ESampConfig
from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import cache_root, write_tiny_model
from tests.conftest import launch_side_by_side
from tests.server_helpers import GREEDY, N_TOKENS, PROMPTS, esamp_stats, explore, gen, post

# Gemma 3's layer capture is not the residual stream (serve refuses it; test_serve_command.py).
SOURCES = {"qwen2": "embed", "qwen3": "layer:1", "qwen3_moe": "layer:1", "gemma3": "embed"}
PATHS = {"full-vocabulary": {}, "post-filter": {"top_k": 8}}


@pytest.fixture(scope="module", params=list(SOURCES))
def family(request) -> tuple[str, Path]:
    arch = request.param
    return arch, write_tiny_model(cache_root() / "models" / f"tiny-{arch}-v520", arch=arch, layers=3)


@pytest.fixture(scope="module")
def servers(family) -> Iterator[tuple[LaunchedServer, LaunchedServer]]:
    """(plain, ESamp)"""
    arch, path = family
    with launch_side_by_side((path, f"plain-{arch}", "--no-esamp"),
                             (path, f"esamp-{arch}", "--esamp-init", "random", "--esamp-source", SOURCES[arch])
                             ) as started:
        yield started[0], started[1]


def test_beta_zero_and_plain_requests_match_plain_sglang(servers):
    plain, esamp = servers
    for prompt in PROMPTS[:2]:
        reference = gen(plain, prompt, **GREEDY)["output_ids"]
        assert gen(esamp, prompt, **GREEDY)["output_ids"] == reference
        assert gen(esamp, prompt, **GREEDY, **explore(0.0))["output_ids"] == reference


@pytest.mark.parametrize("path", list(PATHS))
def test_explore_changes_tokens_and_reports_meta(servers, path):
    _, esamp = servers
    sampled = {"temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True, **PATHS[path]}
    changed = 0
    # A random tiny model's top-8 are near-uniform, so β = 2 mostly sharpens them: a given seed's
    # Gumbel draw keeps its token about one time in three (seen on Qwen3-MoE); four seeds.
    for seed in (1, 2, 3, 4):
        plain = gen(esamp, PROMPTS[1], **sampled, **explore(0.0, seed=seed))["output_ids"]
        out = gen(esamp, PROMPTS[1], **sampled, **explore(2.0, seed=seed, group=f"fam-{path}"))
        changed += out["output_ids"] != plain
        meta = out["meta_info"]["esamp"]
        assert meta["tokens_mixed"] == N_TOKENS and meta["group"] == f"fam-{path}" and meta["mean_novelty"] > 0
    assert changed > 0
    assert esamp_stats(esamp)["hook_errors"] == 0


def test_n_samples_share_one_group(servers):
    _, esamp = servers
    before = esamp_stats(esamp)["groups_created"]
    out = gen(esamp, PROMPTS[0], temperature=1.0, max_new_tokens=4, n=4, **explore(1.0))
    assert len({o["meta_info"]["esamp"]["group"] for o in out}) == 1
    assert esamp_stats(esamp)["groups_created"] - before == 1


def test_states_are_the_ones_the_method_means(family, servers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, path = family
    prompt_ids = AutoTokenizer.from_pretrained(str(path))(PROMPTS[0]).input_ids
    out = post(servers[1], "/generate", {"input_ids": prompt_ids, "sampling_params": {
        **GREEDY, "max_new_tokens": 6, **explore(1.0, debug=True)}}).json()
    steps = out["meta_info"]["esamp_debug"]
    # token t was sampled from the state at position len(prompt) - 1 + t
    ids = torch.tensor([prompt_ids + out["output_ids"][:-1]])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        x, h = shallow_and_deep_states(model, ids, torch.ones_like(ids, dtype=torch.bool),
                                       ESampConfig(source=SOURCES[arch]))
    first = len(prompt_ids) - 1
    assert len(steps) == 6
    for t, step in enumerate(steps):
        torch.testing.assert_close(torch.tensor(step["x"]), x[first + t], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(torch.tensor(step["h"]), h[first + t], rtol=1e-3, atol=1e-3)
