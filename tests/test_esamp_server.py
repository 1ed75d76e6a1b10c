"""ESamp inside a real SGLang server on CPU (tiny model and SmolLM2), against a plain server of
the same build (`--no-esamp`) and, for SmolLM2, transformers. One model's servers at a time."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from esamp_sgl.benchmarks.parity import first_divergence
from tests.conftest import launch, launch_side_by_side
from tests.server_helpers import GREEDY, N_TOKENS, PROMPTS, esamp_stats, explore, gen, lm_head_weight, post


# "tiny-graph": the decode step in the form SGLang's CUDA graphs replay, run eagerly on CPU
# (--esamp-decode-path graph), held to the same expectations as the eager form.
CHAT_PROMPTS = ["What is 7 + 5?", "Name a color of the sky.", "Write the word hello twice."]
DECODE_PATH_FLAGS = {"tiny": (), "tiny-graph": ("--esamp-decode-path", "graph"), "smollm2": ()}


@pytest.fixture(scope="module", params=list(DECODE_PATH_FLAGS))
def model(request, tiny_model_path, smollm2_path) -> tuple[str, Path]:
    return request.param, smollm2_path if request.param == "smollm2" else tiny_model_path


_PLAIN_GREEDY: dict[Path, dict[str, list[int]]] = {}  # per model: tiny and tiny-graph share one plain server
# The reference recipe's mechanics (random init, pre-filter mix); lr 0.05 so that online
# learning shows within a few short requests (the learning test).
ESAMP_FLAGS = ("--esamp-init", "random", "--esamp-filter-mode", "pre", "--esamp-lr", "0.05")


@pytest.fixture(scope="module")
def server(model):
    """The model's ESamp server; beside it at startup, the first time a model is served, a plain
    SGLang server (same build, ESamp off) answers PROMPTS greedily, one at a time, and stops."""
    name, path = model
    flags = (*ESAMP_FLAGS, *DECODE_PATH_FLAGS[name])
    if path in _PLAIN_GREEDY:
        yield from launch(path, f"esamp-{name}", *flags)
        return
    with launch_side_by_side((path, f"plain-{name}", "--no-esamp"), (path, f"esamp-{name}", *flags)) as (plain, esamp):
        _PLAIN_GREEDY[path] = {p: gen(plain, p, **GREEDY)["output_ids"] for p in PROMPTS}
        plain.stop()
        yield esamp


@pytest.fixture(scope="module")
def plain_greedy(model, server) -> dict[str, list[int]]:
    """Greedy output ids of a plain SGLang server for PROMPTS (see ``server``)."""
    return _PLAIN_GREEDY[model[1]]


@pytest.fixture(scope="module")
def tiny_server(server, model):
    """The tiny model's eager server: mechanics that need checking once, not per model."""
    if model[0] != "tiny":
        pytest.skip("runs once, on the tiny model's eager server")
    return server


def test_tokens_are_the_argmax_of_the_recomputed_mix(server, model, plain_greedy):
    W = lm_head_weight(model[1])
    out = gen(server, PROMPTS[0], **GREEDY, **explore(1.0, debug=True))
    debug = out["meta_info"]["esamp_debug"]
    assert len(debug) == len(out["output_ids"]) == N_TOKENS
    for token, step in zip(out["output_ids"], debug):
        h, h_hat = torch.tensor(step["h"]), torch.tensor(step["h_hat"])
        logits = W @ (h + 1.0 * (h - h_hat))
        assert logits[token] >= logits.max() - 1e-3
    assert out["output_ids"] != plain_greedy[PROMPTS[0]]


def test_meta_reports_every_token_mixed(server):
    out = gen(server, PROMPTS[1], temperature=0.8, max_new_tokens=12, **explore(0.5, group="meta-1"))
    meta = out["meta_info"]
    assert meta["esamp"]["tokens_mixed"] == meta["completion_tokens"] > 0
    assert meta["esamp"]["group"] == "meta-1" and meta["esamp"]["beta"] == 0.5
    assert meta["esamp"]["mean_novelty"] > 0


def test_decode_steps_take_the_configured_form(server, model):
    before = esamp_stats(server)["graph_steps"]
    gen(server, PROMPTS[1], max_new_tokens=4, ignore_eos=True, **explore(0.5))
    # the first token comes from the prefill (always eager), the other 3 from decode steps
    assert esamp_stats(server)["graph_steps"] - before == (3 if model[0] == "tiny-graph" else 0)


def test_beta_zero_and_plain_requests_match_plain_sglang(server, plain_greedy):
    for prompt in PROMPTS:
        assert gen(server, prompt, **GREEDY)["output_ids"] == plain_greedy[prompt]
        assert gen(server, prompt, **GREEDY, **explore(0.0))["output_ids"] == plain_greedy[prompt]
        assert "esamp" not in gen(server, prompt, **GREEDY, **explore(0.0))["meta_info"]


def test_plain_greedy_matches_transformers_token_for_token(server, model):
    """SGLang itself, served through esamp-sgl, against transformers on the real pretrained model."""
    name, path = model
    if name != "smollm2":
        pytest.skip("greedy parity with transformers is checked on the real pretrained model")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in CHAT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text).input_ids
        out = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 16,
                                                                               "temperature": 0}}).json()
        with torch.no_grad():
            hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        # Both stop at EOS; compare the tokens both produced (EOS included).
        n = min(len(out["output_ids"]), len(hf_ids))
        served_ids, hf_ids = out["output_ids"][:n], hf_ids[:n]
        assert n >= 8
        if served_ids == hf_ids:
            continue
        step = first_divergence(served_ids, hf_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([ids + hf_ids[:step]])).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"{prompt!r} step {step}: served {served_ids} vs hf {hf_ids}"


def test_shared_prefix_is_reused_from_the_radix_cache(server):
    prefix = "You are a careful assistant. Count slowly and explain every step. " * 4
    first = gen(server, prefix + "First question.", max_new_tokens=2)
    second = gen(server, prefix + "Second question.", max_new_tokens=2, **explore(0.5))
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] // 2


def test_plain_rows_batched_with_exploring_rows_are_unchanged(server, plain_greedy):
    with ThreadPoolExecutor(8) as pool:
        exploring = [pool.submit(gen, server, p, temperature=1.0, max_new_tokens=N_TOKENS, n=3, **explore(1.0))
                     for p in PROMPTS]
        plain = {p: pool.submit(gen, server, p, **GREEDY) for p in PROMPTS}
        zero = {p: pool.submit(gen, server, p, **GREEDY, **explore(0.0)) for p in PROMPTS}
        for f in exploring:
            assert all(o["meta_info"]["esamp"]["tokens_mixed"] == o["meta_info"]["completion_tokens"]
                       for o in f.result())
    for p in PROMPTS:
        assert plain[p].result()["output_ids"] == plain_greedy[p]
        assert zero[p].result()["output_ids"] == plain_greedy[p]


def test_a_group_learns_its_tokens(server):
    # β tiny: the tokens stay greedy's, so trained and fresh groups are scored on the same tokens
    prompt, tiny_beta = PROMPTS[2], 1e-3
    for _ in range(3):
        gen(server, prompt, **GREEDY, **explore(tiny_beta, group="learned"))
    trained = gen(server, prompt, **GREEDY, **explore(tiny_beta, group="learned"))
    fresh = gen(server, prompt, **GREEDY, **explore(tiny_beta, group="fresh"))
    assert trained["output_ids"] == fresh["output_ids"]
    assert trained["meta_info"]["esamp"]["mean_novelty"] < 0.8 * fresh["meta_info"]["esamp"]["mean_novelty"]


def test_groups_are_isolated(server):
    alone = gen(server, PROMPTS[0], **GREEDY, **explore(1.0, group="iso-alone"))
    with ThreadPoolExecutor(4) as pool:
        together = pool.submit(gen, server, PROMPTS[0], **GREEDY, **explore(1.0, group="iso-together"))
        pool.submit(gen, server, PROMPTS[1], temperature=1.0, max_new_tokens=N_TOKENS, n=3,
                    **explore(2.0, group="iso-other")).result()
    assert together.result()["output_ids"] == alone["output_ids"]


def test_n_samples_share_one_group_and_requests_get_their_own(server):
    first = gen(server, PROMPTS[1], temperature=1.0, max_new_tokens=4, n=3, **explore(0.5))
    second = gen(server, PROMPTS[1], temperature=1.0, max_new_tokens=4, n=2, **explore(0.5))
    groups_first = {o["meta_info"]["esamp"]["group"] for o in first}
    groups_second = {o["meta_info"]["esamp"]["group"] for o in second}
    assert len(groups_first) == 1 and len(groups_second) == 1 and groups_first != groups_second


def test_streaming_reports_meta(server):
    resp = requests.post(server.url + "/generate", json={"text": PROMPTS[2], "stream": True, "sampling_params": {
        "temperature": 0.8, "max_new_tokens": 10, "ignore_eos": True, **explore(0.5)}}, stream=True, timeout=300)
    chunks = [json.loads(line[len(b"data: "):]) for line in resp.iter_lines()
              if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert len(chunks) > 1
    assert chunks[-1]["meta_info"]["esamp"]["tokens_mixed"] == chunks[-1]["meta_info"]["completion_tokens"] == 10


def test_openai_endpoints_carry_explore(server):
    before = esamp_stats(server)["mixed_tokens"]
    completion = post(server, "/v1/completions", {"model": "default", "prompt": PROMPTS[0], "max_tokens": 5,
                                                  "temperature": 0.8, "n": 2, **explore(0.5)}).json()
    chat = post(server, "/v1/chat/completions", {"model": "default", "max_tokens": 5, "temperature": 0.8,
                                                 "messages": [{"role": "user", "content": "Hi"}], **explore(0.5)}).json()
    produced = completion["usage"]["completion_tokens"] + chat["usage"]["completion_tokens"]
    # usage leaves out a final stop/EOS token, which was sampled (and mixed): ≤ 1 per choice
    assert produced <= esamp_stats(server)["mixed_tokens"] - before <= produced + 3
    summaries = completion["metadata"]["esamp"] + chat["metadata"]["esamp"]  # one per choice
    assert len(summaries) == 3 and all(e["beta"] == 0.5 and e["tokens_mixed"] >= 1 for e in summaries)
    assert summaries[0]["group"] == summaries[1]["group"] != summaries[2]["group"]  # n = 2: one group
    plain = post(server, "/v1/completions", {"model": "default", "prompt": PROMPTS[0], "max_tokens": 2}).json()
    assert "esamp" not in plain["metadata"]
    bad = post(server, "/v1/chat/completions", {"model": "default", "max_tokens": 5, **explore(-2),
                                                "messages": [{"role": "user", "content": "Hi"}]}, ok=False)
    assert bad.status_code == 400 and "esamp.beta" in bad.text


def test_regex_constraint_holds_while_exploring(server):
    for _ in range(3):
        out = gen(server, "My number is ", temperature=1.0, max_new_tokens=8, regex="[0-9]{3}", **explore(2.0))
        assert re.fullmatch("[0-9]{3}", out["text"]), out["text"]


def test_server_survives_an_abort_mid_generation(server):
    resp = requests.post(server.url + "/generate", json={"text": PROMPTS[0], "stream": True, "sampling_params": {
        "temperature": 1.0, "max_new_tokens": 4000, "ignore_eos": True, **explore(1.0, group="aborted")}},
        stream=True, timeout=300)
    lines = resp.iter_lines()
    for _ in range(3):
        next(lines)
    resp.close()  # the client goes away: SGLang aborts the request
    assert wait_until_no_request_explores(server) == 0
    after = gen(server, PROMPTS[1], max_new_tokens=3, ignore_eos=True, **explore(0.5))
    assert after["meta_info"]["esamp"]["tokens_mixed"] == 3


def wait_until_no_request_explores(server, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (exploring := esamp_stats(server)["requests_exploring"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return exploring


def test_an_idle_server_sleeps_instead_of_polling(tiny_server):
    """The CPU defaults' --sleep-on-idle: all of the server's processes together use a fraction
    of a core while no request is in flight (a polling scheduler alone takes a whole one)."""
    root = psutil.Process(tiny_server.process.pid)
    processes = [root, *root.children(recursive=True)]

    def cpu_seconds() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in processes)

    gen(tiny_server, PROMPTS[0], **GREEDY)
    time.sleep(1.0)
    before = cpu_seconds()
    time.sleep(3.0)
    assert cpu_seconds() - before < 0.6
    assert gen(tiny_server, PROMPTS[0], **GREEDY)["output_ids"]  # and it wakes for the next request


def test_aborting_one_fork_leaves_its_siblings_exploring(tiny_server):
    server = tiny_server
    group = "abort-one-fork"

    def fork(rid: str, tokens: int):
        return post(server, "/generate", {"text": PROMPTS[0], "rid": rid, "sampling_params": {
            "temperature": 1.0, "max_new_tokens": tokens, "ignore_eos": True, **explore(1.0, group=group)}}, ok=False)

    with ThreadPoolExecutor(3) as pool:
        doomed = pool.submit(fork, "fork-doomed", 1500)
        siblings = [pool.submit(fork, f"fork-{i}", 400) for i in range(2)]
        time.sleep(0.5)
        assert not any(f.done() for f in siblings)  # the abort lands while the siblings decode
        requests.post(server.url + "/abort_request", json={"rid": "fork-doomed"}, timeout=30)
        doomed, siblings = doomed.result(), [f.result().json() for f in siblings]
    assert "abort" in doomed.text.lower()
    for out in siblings:
        meta = out["meta_info"]
        assert meta["completion_tokens"] == meta["esamp"]["tokens_mixed"] == 400 and meta["esamp"]["group"] == group
    assert wait_until_no_request_explores(server) == 0


@pytest.mark.parametrize("stop", ["max_new_tokens", "stop_token_ids", "stop"])
def test_a_request_that_stops_at_its_first_token(tiny_server, stop):
    server = tiny_server
    """β small enough that greedy keeps its first token, which then ends the request at once."""
    sampling = {"temperature": 0, "max_new_tokens": 8, **explore(1e-4)}
    first = gen(server, PROMPTS[1], **{**sampling, "max_new_tokens": 1})
    sampling |= {"max_new_tokens": {"max_new_tokens": 1}, "stop_token_ids": {"stop_token_ids": first["output_ids"]},
                 "stop": {"stop": [first["text"]]}}[stop]
    assert first["text"].strip()
    out = gen(server, PROMPTS[1], **sampling)
    assert out["meta_info"]["completion_tokens"] == out["meta_info"]["esamp"]["tokens_mixed"] == 1
    assert wait_until_no_request_explores(server) == 0
    assert gen(server, PROMPTS[2], **GREEDY, **explore(0.5))["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS


def test_seeded_requests_are_reproducible(server):
    sampled = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    exploring = [gen(server, PROMPTS[2], **sampled, **explore(1.0, seed=123))["output_ids"] for _ in range(2)]
    assert exploring[0] == exploring[1]  # each request starts a fresh group, so the mix repeats too
    plain = gen(server, PROMPTS[2], **sampled, **explore(0.0, seed=123))["output_ids"]
    with ThreadPoolExecutor(4) as pool:  # batched with unseeded traffic: same seeded sample
        again = pool.submit(gen, server, PROMPTS[2], **sampled, **explore(0.0, seed=123))
        pool.submit(gen, server, PROMPTS[0], temperature=1.0, max_new_tokens=12, n=3).result()
    assert again.result()["output_ids"] == plain
    other_seeds = [gen(server, PROMPTS[2], **sampled, **explore(0.0, seed=s))["output_ids"] for s in (1, 2)]
    assert any(o != plain for o in other_seeds)  # the seed, not a fixed draw, decides


# Any JSON value, nested a little: what a client can put where ESamp reads.
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
ESAMP_OBJECT = st.dictionaries(st.sampled_from(["beta", "group", "seed", "debug", "bta"]) | st.text(max_size=8),
                               JSON | st.floats(min_value=0, max_value=8), max_size=4)
CUSTOM_PARAMS = st.one_of(JSON, st.fixed_dictionaries({"esamp": JSON | ESAMP_OBJECT}))


def post_json(server, path: str, body: dict, **kw) -> requests.Response:
    """POST with Python's JSON encoder, which writes NaN and ±inf as the tokens clients send."""
    return requests.post(server.url + path, data=json.dumps(body), headers={"Content-Type": "application/json"},
                         timeout=60, **kw)


@settings(max_examples=40, deadline=None)
@given(custom_params=CUSTOM_PARAMS, endpoint=st.sampled_from(["/generate", "/v1/completions"]))
@example(custom_params=float("inf"), endpoint="/generate")
@example(custom_params={"esamp": {"beta": float("nan")}}, endpoint="/v1/completions")
def test_arbitrary_custom_params_get_200_or_4xx(tiny_server, custom_params, endpoint):
    """Whatever a client sends as custom_params: an answer within a bound, never a 5xx or a hang
    (NaN and ±inf travel as the non-standard JSON tokens clients write for them: post_json)."""
    if endpoint == "/generate":
        body = {"text": "x", "sampling_params": {"max_new_tokens": 2, "custom_params": custom_params}}
    else:
        body = {"model": "default", "prompt": "x", "max_tokens": 2, "custom_params": custom_params}
    resp = post_json(tiny_server, endpoint, body)
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])


# NaN and ±inf are not JSON: SGLang's request parser refuses the body (HTTP 400 json_invalid) on
# every endpoint before ESamp reads it.
BAD_EXPLORE = [({"beta": True}, "esamp.beta"), ({"beta": "0.5"}, "esamp.beta"), ({"beta": float("nan")}, "json_invalid"),
               ({"beta": float("inf")}, "json_invalid"), ({"beta": float("-inf")}, "json_invalid"),
               ({"beta": -1}, "esamp.beta"), ({"beta": 4.5}, "esamp.beta"), ({"beta": 10**30}, "esamp.beta"),
               ({"beta": 0.5, "group": ""}, "esamp.group"), ({"beta": 0.5, "group": "g" * 300}, "esamp.group"),
               ({"beta": 0.5, "group": ["a"]}, "esamp.group"), ({"beta": 0.5, "seed": 2**63}, "esamp.seed"),
               ({"beta": 0.5, "seed": 1.5}, "esamp.seed"), ({"beta": 0.5, "debug": "yes"}, "esamp.debug"),
               ({"beta": 0.5, "x": 1}, "unknown field"), ("on", "custom_params.esamp"),
               ({"esamp": {"beta": 0.5}}, "unknown field")]


def request_forms(custom_params) -> dict[str, tuple[str, dict]]:
    """Every way a request carries custom_params: /generate single, batch, n > 1 and streaming;
    both OpenAI endpoints, streaming and not."""
    sp = {"max_new_tokens": 2, "custom_params": custom_params}
    chat = {"model": "default", "max_tokens": 2, "custom_params": custom_params,
            "messages": [{"role": "user", "content": "x"}]}
    completion = {"model": "default", "prompt": "x", "max_tokens": 2, "custom_params": custom_params}
    return {"generate": ("/generate", {"text": "x", "sampling_params": sp}),
            "generate_batch": ("/generate", {"text": ["x", "y"], "sampling_params": [{"max_new_tokens": 2}, sp]}),
            "generate_n": ("/generate", {"text": "x", "sampling_params": {**sp, "n": 3, "temperature": 1.0}}),
            "generate_stream": ("/generate", {"text": "x", "stream": True, "sampling_params": sp}),
            "completions": ("/v1/completions", completion),
            "completions_stream": ("/v1/completions", {**completion, "stream": True}),
            "chat": ("/v1/chat/completions", chat),
            "chat_stream": ("/v1/chat/completions", {**chat, "stream": True})}


def test_every_bad_value_is_http_400_naming_its_field_on_every_endpoint(tiny_server, plain_greedy):
    """Streaming included: the check runs before a stream starts, so the answer is a 400, not an
    error chunk inside a 200. Plain requests batched beside the refused ones are unchanged, and an exploring
    request right after still mixes."""
    wrong = []
    with ThreadPoolExecutor(4) as pool:
        beside = {p: pool.submit(gen, tiny_server, p, **GREEDY) for p in PROMPTS}
        for esamp, field in BAD_EXPLORE:
            for form, (path, body) in request_forms({"esamp": esamp}).items():
                resp = post_json(tiny_server, path, body)
                if resp.status_code != 400 or field not in resp.text:
                    wrong.append((form, esamp if len(repr(esamp)) < 60 else "...", resp.status_code, resp.text[:120]))
        assert {p: f.result()["output_ids"] for p, f in beside.items()} == plain_greedy
    assert not wrong, "\n".join(map(str, wrong))
    after = gen(tiny_server, "x", max_new_tokens=2, ignore_eos=True, **explore(0.5))
    assert after["meta_info"]["esamp"]["tokens_mixed"] == 2


@pytest.mark.parametrize("group", ["grüße-分组-🙂", "tab\tnewline\nnul\u0000", "g" * 256])
def test_group_keys_are_opaque_strings(tiny_server, group):
    out = post_json(tiny_server, "/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 2, "ignore_eos": True, **explore(0.5, group=group)}}).json()
    assert out["meta_info"]["esamp"]["group"] == group and out["meta_info"]["esamp"]["tokens_mixed"] == 2


@pytest.mark.parametrize("custom_params", [1, [{"esamp": {"beta": 0.5}}], '{"esamp": {"beta": 0.5}}'])
def test_custom_params_that_is_not_an_object_is_http_400(tiny_server, custom_params):
    """Found by the fuzz: a 500 from the validation hook before it named the field."""
    resp = post(tiny_server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2,
                                                                            "custom_params": custom_params}}, ok=False)
    assert resp.status_code == 400 and "custom_params must be an object" in resp.text


def test_plain_requests_are_unchanged_after_the_fuzz(tiny_server, plain_greedy):
    for prompt in PROMPTS:
        assert gen(tiny_server, prompt, **GREEDY)["output_ids"] == plain_greedy[prompt]
    assert esamp_stats(tiny_server)["hook_errors"] == 0
