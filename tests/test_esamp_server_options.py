"""Server options on one real server (tiny model): post-filter mode (the base model picks the
candidates), a captured layer as the distiller's source, warm-up on prompt states, a β schedule, chunked
prefill, ESamp's gauges on /metrics, and faults injected into ESamp's hooks (contained: the step
runs plain, the server goes on)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import math

import pytest
import requests
import torch

from runtime_patch.scheduler_state import FAULT_GROUP_PREFIX, FAULTS_ENV, NONFINITE_GROUP_PREFIX
from tests.conftest import launch
from tests.server_helpers import GREEDY, N_TOKENS, PROMPTS, esamp_stats, explore, gen, lm_head_weight, post


CHUNK = 64  # prefill chunk size: long prompts arrive in several forwards


@pytest.fixture(scope="module", params=["auto", "graph"])  # graph: the CUDA-graph form of the decode step, eagerly
def server(request, tiny_model_path):
    flags = ("--esamp-init", "random", "--esamp-filter-mode", "post", "--esamp-source", "layer:1", "--esamp-lr", "0.05",
             "--esamp-warmup-steps", "2", "--esamp-beta-halflife", "8", "--chunked-prefill-size", str(CHUNK),
             "--enable-metrics", "--esamp-decode-path", request.param)
    # Faults in the mix of a prefill or eager decode step and in the graph form's step; NaN training inputs.
    yield from launch(tiny_model_path, f"esamp-tiny-options-{request.param}", *flags, env={FAULTS_ENV: "mix,graph_step,nonfinite"})


def test_post_filter_mode_keeps_the_base_candidates(server, tiny_model_path):
    W = lm_head_weight(tiny_model_path)
    greedy_plain = gen(server, PROMPTS[0], **GREEDY)["output_ids"]
    # greedy: the base keeps one candidate, so reweighting cannot change it
    assert gen(server, PROMPTS[0], **GREEDY, **explore(2.0))["output_ids"] == greedy_plain
    out = gen(server, PROMPTS[1], temperature=1.0, top_k=3, max_new_tokens=N_TOKENS, ignore_eos=True,
              **explore(2.0, debug=True))
    for token, step in zip(out["output_ids"], out["meta_info"]["esamp_debug"]):
        assert token in (W @ torch.tensor(step["h"])).topk(3).indices.tolist()
    assert out["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS


def test_post_filter_min_p_keeps_the_base_min_p_candidates(server, tiny_model_path):
    W = lm_head_weight(tiny_model_path)
    min_p = 0.9  # a handful of the tiny model's 512 tokens at temperature 1
    out = gen(server, PROMPTS[1], temperature=1.0, min_p=min_p, max_new_tokens=N_TOKENS, ignore_eos=True,
              **explore(2.0, debug=True))
    for token, step in zip(out["output_ids"], out["meta_info"]["esamp_debug"]):
        probs = torch.softmax(W @ torch.tensor(step["h"]), dim=-1)
        assert probs[token] >= 0.99 * min_p * probs.max()
    assert out["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS


def test_post_filter_without_base_filters_samples_the_full_mix(server, tiny_model_path):
    # No top-k/top-p/min-p: every token is a candidate, and the returned logprobs are the mixed ones.
    W = lm_head_weight(tiny_model_path)
    sampling = {"temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True, **explore(2.0, debug=True)}
    out = post(server, "/generate", {"text": PROMPTS[2], "return_logprob": True, "sampling_params": sampling}).json()
    steps = out["meta_info"]["esamp_debug"]
    assert len(steps) == N_TOKENS
    for (logprob, token, _), step in zip(out["meta_info"]["output_token_logprobs"], steps):
        h, h_hat = torch.tensor(step["h"]), torch.tensor(step["h_hat"])
        mixed = torch.log_softmax(W @ (h + step["beta"] * (h - h_hat)), dim=-1)
        assert logprob == pytest.approx(mixed[token].item(), abs=1e-3)


def test_host_time_is_reported_by_part(server):
    """Every part of a post-filter decode step is charged, and the parts add up to ESamp's total."""
    before = esamp_stats(server)
    gen(server, PROMPTS[1], temperature=1.0, top_k=5, max_new_tokens=N_TOKENS, ignore_eos=True, **explore(1.0))
    after = esamp_stats(server)
    grew = {part: after["part_seconds"][part] - before["part_seconds"][part] for part in after["part_seconds"]}
    for part in ("rows", "shallow_state", "distill_and_mix", "training", "candidate_mask", "reweight", "meta"):
        assert grew[part] > 0, part
    assert sum(grew.values()) == pytest.approx(after["esamp_seconds"] - before["esamp_seconds"], abs=1e-4)
    assert 0 < after["esamp_seconds"] - before["esamp_seconds"] < after["forward_seconds"] - before["forward_seconds"]


def test_counters_reach_prometheus_metrics(server):
    before = esamp_stats(server)["hook_errors"]
    gen(server, PROMPTS[2], temperature=1.0, max_new_tokens=20, ignore_eos=True, **explore(1.0))
    assert esamp_stats(server)["hook_errors"] == before  # publishing is no hook error (it was: the config dict)
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    mixed = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("esamp:mixed_tokens")]
    assert mixed and mixed[0] > 0
    assert "esamp:groups_live" in metrics and "esamp:training_steps" in metrics


def test_layer_source_explores_and_learns(server):
    prompt = PROMPTS[2]
    sampled = {"temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True}
    first = gen(server, prompt, **sampled, **explore(1.0, group="layer-src", seed=5))
    for _ in range(3):
        gen(server, prompt, **sampled, **explore(1.0, group="layer-src", seed=5))
    later = gen(server, prompt, **sampled, **explore(1.0, group="layer-src", seed=5))
    assert first["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS
    assert later["meta_info"]["esamp"]["mean_novelty"] < first["meta_info"]["esamp"]["mean_novelty"]


def test_n_samples_warm_their_group_up_on_the_prompt_once(server):
    before = esamp_stats(server)
    prompt = "Warm-up check: " + " ".join(f"item {i}," for i in range(30))
    outs = gen(server, prompt, temperature=1.0, max_new_tokens=4, n=4, ignore_eos=True, **explore(1.0))
    after = esamp_stats(server)
    prompt_tokens = outs[0]["meta_info"]["prompt_tokens"]
    warmed = after["warmed_up_tokens"] - before["warmed_up_tokens"]
    # SGLang's prefix warm-up computes the prompt once; the radix cache gives the 4 samples the rest
    assert prompt_tokens <= warmed < prompt_tokens + 4 * 4
    assert after["groups_created"] - before["groups_created"] == 1
    # 2 warm-up steps per extend pass (at least the prefix warm-up's) + one per decode step
    assert after["training_steps"] - before["training_steps"] >= 2 + 3


def test_beta_halves_every_halflife_tokens(server):
    out = gen(server, PROMPTS[0], temperature=1.0, max_new_tokens=N_TOKENS, ignore_eos=True, **explore(2.0, debug=True))
    betas = [step["beta"] for step in out["meta_info"]["esamp_debug"]]
    assert betas == pytest.approx([2.0 * 0.5 ** (i / 8) for i in range(N_TOKENS)])
    assert out["meta_info"]["esamp"]["beta"] == 2.0


def test_chunked_prefill_warms_up_on_every_chunk_and_mixes_only_sampled_tokens(server):
    before = esamp_stats(server)
    prompt = "Chunked: " + " ".join(f"row {i};" for i in range(60))
    out = gen(server, prompt, temperature=1.0, max_new_tokens=8, ignore_eos=True, **explore(1.0))
    after = esamp_stats(server)
    prompt_tokens = out["meta_info"]["prompt_tokens"]
    assert prompt_tokens > 2 * CHUNK
    assert out["meta_info"]["esamp"]["tokens_mixed"] == after["mixed_tokens"] - before["mixed_tokens"] == 8
    assert prompt_tokens - 4 <= after["warmed_up_tokens"] - before["warmed_up_tokens"] <= prompt_tokens


def test_a_fault_in_a_hook_serves_its_steps_plain_and_the_server_goes_on(server):
    before = esamp_stats(server)
    with ThreadPoolExecutor(2) as pool:
        faulty = pool.submit(gen, server, PROMPTS[0], temperature=1.0, top_k=5, max_new_tokens=N_TOKENS,
                             ignore_eos=True, **explore(2.0, group=FAULT_GROUP_PREFIX + "-1"))
        beside = pool.submit(gen, server, PROMPTS[1], temperature=1.0, top_k=5, max_new_tokens=N_TOKENS,
                             ignore_eos=True, **explore(1.0))
        faulty, beside = faulty.result(), beside.result()
    assert faulty["meta_info"]["completion_tokens"] == beside["meta_info"]["completion_tokens"] == N_TOKENS
    assert "esamp" not in faulty["meta_info"]  # every step that held its row ran plain
    assert esamp_stats(server)["hook_errors"] - before["hook_errors"] >= N_TOKENS
    again = gen(server, PROMPTS[2], temperature=1.0, top_k=5, max_new_tokens=N_TOKENS, ignore_eos=True,
                **explore(1.0))
    assert again["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS


def test_non_finite_training_inputs_reset_the_slot_and_the_group_goes_on(server):
    """NaN in one group's training rows: its slot is reset (counted), it keeps exploring with
    finite states, and a group batched beside it samples what it samples alone."""
    sampled = {"temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True}
    alone = gen(server, PROMPTS[1], **sampled, **explore(1.0, group="clean-alone", seed=11))
    before = esamp_stats(server)
    with ThreadPoolExecutor(2) as pool:
        poisoned = pool.submit(gen, server, PROMPTS[0], **sampled, **explore(1.0, group=NONFINITE_GROUP_PREFIX + "-1"))
        beside = pool.submit(gen, server, PROMPTS[1], **sampled, **explore(1.0, group="clean-beside", seed=11))
        poisoned, beside = poisoned.result(), beside.result()
    after = esamp_stats(server)
    assert after["distiller_resets"] - before["distiller_resets"] >= N_TOKENS - 2  # a reset per trained step
    assert after["hook_errors"] == before["hook_errors"]  # nothing raised: the bank caught it
    meta = poisoned["meta_info"]["esamp"]
    assert meta["tokens_mixed"] == N_TOKENS and math.isfinite(meta["mean_novelty"])
    assert beside["output_ids"] == alone["output_ids"]
