"""Scaling out on SGLang's own machinery, on these CPUs (tiny model): tensor parallel (a
``--tp-size 2`` server beside a ``--tp-size 1`` one with the same flags), and what SGLang's
router does in front of the two as replicas. Data parallel: test_data_parallel.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

import esamp_sgl  # noqa: F401  (explore= in sgl.gen)
from esamp_sgl.benchmarks.parity import first_divergence, top_two_gap
from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.router_route import ROUTING_KEY
from runtime_patch.scheduler_state import FAULT_GROUP_PREFIX, FAULTS_ENV
from tests.conftest import LaunchedRouter, launch_side_by_side
from tests.server_helpers import GREEDY, N_TOKENS, PROMPTS, complete_in_group, esamp_stats, explore, gen, post

FLAGS = ("--esamp-init", "random", "--esamp-lr", "0.05", "--esamp-warmup-steps", "2")  # warm-up: rank-local training
TIE = 1e-4  # top-two logprobs closer than this are a float tie: TP's all-reduce sums in another order


@pytest.fixture(scope="module")
def servers(tiny_model_path) -> Iterator[list[LaunchedServer]]:
    """(TP 1, TP 2), started side by side; "held_part" faults (TP only) for test-fault groups."""
    with launch_side_by_side((tiny_model_path, "esamp-tiny-tp1", *FLAGS),
                             (tiny_model_path, "esamp-tiny-tp2", *FLAGS, "--tp-size", "2"),
                             env={FAULTS_ENV: "held_part"}) as started:
        yield started


def generate(server: LaunchedServer, text: str, **sampling) -> dict:
    return post(server, "/generate", {"text": text, "return_logprob": True, "top_logprobs_num": 2,
                                      "sampling_params": sampling}).json()


def assert_same_tokens_or_float_tie(reference: dict, out: dict, greedy: bool) -> None:
    """Same tokens with the same logprobs; where a greedy run diverges, the reference's top two
    logprobs at that step must be a float tie (and the rest of the run then differs freely)."""
    ref_ids, ids = reference["output_ids"], out["output_ids"]
    diverged = first_divergence(ref_ids, ids)
    upto = len(ref_ids) if diverged is None else diverged
    ref_lp = [t[0] for t in reference["meta_info"]["output_token_logprobs"][:upto]]
    lp = [t[0] for t in out["meta_info"]["output_token_logprobs"][:upto]]
    assert max((abs(a - b) for a, b in zip(ref_lp, lp)), default=0.0) < 1e-3
    if diverged is not None:
        assert greedy, f"seeded run diverged at step {diverged}: {ref_ids} vs {ids}"
        gap = top_two_gap(reference, diverged)
        assert gap < TIE, f"step {diverged} is no tie: top-two gap {gap}"


@pytest.mark.parametrize("case", ["greedy", "seeded-pre-path", "seeded-post-path"])
def test_tp2_explores_as_tp1(servers, case):
    """Post-filter servers: no top-k/top-p/min-p sends the batch down the pre-filter path (mixed
    h over the whole vocabulary, every token a candidate); top-k reweights the base's candidates
    with L(ĥ) projected beside h in the LM head's pass, which TP all-gathers over the vocabulary."""
    sampling = {"greedy": dict(GREEDY),
                "seeded-pre-path": {"temperature": 1.0, "max_new_tokens": N_TOKENS, "ignore_eos": True},
                "seeded-post-path": {"temperature": 1.0, "top_k": 8, "max_new_tokens": N_TOKENS, "ignore_eos": True},
                }[case]
    esamp = {"group": f"tp-{case}-{uuid.uuid4().hex}"} | ({} if case == "greedy" else {"seed": 7})
    tp1, tp2 = servers
    reference = generate(tp1, PROMPTS[1], **sampling, **explore(1.0, **esamp))
    out = generate(tp2, PROMPTS[1], **sampling, **explore(1.0, **esamp))
    assert out["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS
    assert_same_tokens_or_float_tie(reference, out, greedy=case == "greedy")


def test_tp2_in_graph_form_explores_as_tp1(servers, tiny_model_path):
    """The decode step in the form a captured CUDA graph replays (distill_and_mix_sharded inside
    GraphRows, the all-reduce in the step) at TP 2, against the eager TP 1 server."""
    tp1, _ = servers
    with launch_side_by_side((tiny_model_path, "esamp-tiny-tp2-graph", *FLAGS, "--tp-size", "2",
                              "--esamp-decode-path", "graph")) as (graph_tp2,):
        for case, sampling in (("greedy", dict(GREEDY)),
                               ("seeded-post-path", {"temperature": 1.0, "top_k": 8, "max_new_tokens": N_TOKENS,
                                                     "ignore_eos": True, "seed": 7})):
            seed = sampling.pop("seed", None)
            esamp = {"group": f"tp-graph-{case}-{uuid.uuid4().hex}"} | ({} if seed is None else {"seed": seed})
            reference = generate(tp1, PROMPTS[2], **sampling, **explore(1.0, **esamp))
            out = generate(graph_tp2, PROMPTS[2], **sampling, **explore(1.0, **esamp))
            assert out["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS
            assert_same_tokens_or_float_tie(reference, out, greedy=case == "greedy")
        assert esamp_stats(graph_tp2)["graph_steps"] >= 2 * (N_TOKENS - 1)


def test_tp_ranks_share_the_groups_out(servers):
    """Each TP rank holds and trains its half of the groups (esamp_sgl/shard.py), not a copy of
    all of them; test_tp2_explores_as_tp1 shows that the tokens do not change for it."""
    tp1, tp2 = servers
    with ThreadPoolExecutor(3) as pool:  # several groups, batched together
        list(pool.map(lambda i: gen(tp2, PROMPTS[i], temperature=1.0, max_new_tokens=8, n=2,
                                    **explore(1.0, group=f"share-{uuid.uuid4().hex}")), range(3)))
    stats = esamp_stats(tp2)
    assert stats["hook_errors"] == 0 and stats["mixed_tokens"] > 0 and stats["warmed_up_tokens"] > 0
    assert stats["bank_slots"] == -(-stats["slots_max"] // 2) == -(-esamp_stats(tp1)["bank_slots"] // 2)
    assert len(stats["training_steps_per_rank"]) == 2 and min(stats["training_steps_per_rank"]) > 0
    checksums = stats["distiller_checksums"]
    assert len(checksums) == 2 and checksums[0] != checksums[1]  # different groups' weights
    assert stats["slot_tables_agree"]


def test_a_fault_on_one_tp_rank_serves_its_groups_rows_unmixed_on_every_rank(servers):
    """The rank that holds a fault-test group fails its prediction every step; the ranks still
    meet in their all-reduce (no hang), that group's rows are served unmixed on both (its greedy
    tokens are plain ones), the group beside it keeps exploring, and the error is counted."""
    _, tp2 = servers
    before = sum(esamp_stats(tp2)["hook_errors_per_rank"])
    with ThreadPoolExecutor(2) as pool:
        faulty = pool.submit(gen, tp2, PROMPTS[0], **GREEDY, **explore(2.0, group=f"{FAULT_GROUP_PREFIX}-{uuid.uuid4().hex}"))
        beside = pool.submit(gen, tp2, PROMPTS[1], temperature=1.0, max_new_tokens=N_TOKENS, ignore_eos=True,
                             **explore(1.0, group=f"beside-{uuid.uuid4().hex}"))
        faulty, beside = faulty.result(), beside.result()
    assert faulty["output_ids"] == gen(tp2, PROMPTS[0], **GREEDY)["output_ids"]
    assert faulty["meta_info"]["esamp"]["mean_novelty"] == 0.0
    assert beside["meta_info"]["esamp"]["tokens_mixed"] == N_TOKENS and beside["meta_info"]["esamp"]["mean_novelty"] > 0
    assert sum(esamp_stats(tp2)["hook_errors_per_rank"]) - before >= N_TOKENS


def test_beta_zero_is_plain_at_tp2(servers):
    _, tp2 = servers
    for prompt in PROMPTS:
        plain = gen(tp2, prompt, **GREEDY)["output_ids"]
        assert gen(tp2, prompt, **GREEDY, **explore(0.0))["output_ids"] == plain


@sgl.function
def forks_exploring(s, question):
    s += question
    forks = s.fork(2)
    forks += sgl.gen("answer", max_tokens=4, temperature=1.0, ignore_eos=True, explore=0.5)
    s["esamp"] = [f.get_meta_info("answer").get("esamp") for f in forks]


ROUTER_FLAGS = ("--policy", "manual", "--assignment-mode", "min_group")


@pytest.fixture(scope="module")
def router(servers) -> Iterator[LaunchedRouter]:
    """SGLang's router in front of the two servers as replicas: a request's X-SMG-Routing-Key
    picks its replica once (the replica with the fewest keys) and keeps it there."""
    with LaunchedRouter([s.url for s in servers], *ROUTER_FLAGS, name="router-replicas") as launched:
        yield launched


def counters(servers: list[LaunchedServer], name: str) -> list[int]:
    return [esamp_stats(s)[name] for s in servers]


def test_router_keeps_each_group_on_one_replica(servers, router):
    """The README's commands: the OpenAI client (extra_body, extra_headers) and curl's body with
    the group as routing key, on /v1/completions through the router. Every token of every request
    is mixed, and each group is created on exactly one replica (a group split over the two would
    be created on both)."""
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    groups = [f"router-{uuid.uuid4().hex}" for _ in range(4)]
    max_tokens = 4

    def complete_openai(job: tuple[str, str]) -> None:
        group, prompt = job
        client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                  extra_body={**explore(0.5, group=group), "ignore_eos": True},
                                  extra_headers={ROUTING_KEY: group})

    created, mixed = counters(servers, "groups_created"), counters(servers, "mixed_tokens")
    jobs = [(g, p) for g in groups for p in PROMPTS[:2]]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(complete_openai, jobs[::2]))
        list(pool.map(lambda job: complete_in_group(router.url, job[1], job[0], max_tokens), jobs[1::2]))
    created = [a - b for a, b in zip(counters(servers, "groups_created"), created)]
    mixed = [a - b for a, b in zip(counters(servers, "mixed_tokens"), mixed)]
    assert sum(mixed) == len(jobs) * max_tokens
    assert sum(created) == len(groups)


def test_fork_programs_explore_through_the_router_one_replica_per_group(servers, router):
    """SGLang programs through the router: exploring gens go out as /v1/completions with the fork
    group as routing key (esamp_sgl.router_route), so every fork explores, reports its group, and
    each group is created on one replica (once in all: a group split over the two would be
    created on both)."""
    created = counters(servers, "groups_created")
    states = forks_exploring.run_batch([{"question": p} for p in PROMPTS + PROMPTS[:1]],
                                       backend=RuntimeEndpoint(router.url), num_threads=4)
    for state in states:
        assert state.error() is None, state.error()
        summaries = state["esamp"]
        assert [e["tokens_mixed"] for e in summaries] == [4, 4]
        assert len({e["group"] for e in summaries}) == 1
    assert len({state["esamp"][0]["group"] for state in states}) == len(states)
    created = [a - b for a, b in zip(counters(servers, "groups_created"), created)]
    assert sum(created) == len(states)


def test_router_drops_custom_params_on_generate_and_chat(servers, router):
    """sglang-router 0.3.2 re-serializes /generate and /v1/chat/completions through typed structs
    without custom_params (/v1/completions keeps it): an exploring request there reaches its
    worker as a plain one, which is why programs explore through /v1/completions behind it. When
    a router version carries custom_params on /generate, this test fails: then router_route can go."""
    group = "via-router-" + uuid.uuid4().hex
    mixed = counters(servers, "mixed_tokens")
    resp = requests.post(router.url + "/generate", headers={ROUTING_KEY: group}, timeout=120, json={
        "text": PROMPTS[0], "sampling_params": {"temperature": 1.0, "max_new_tokens": 4, **explore(0.5, group=group)}})
    assert resp.status_code == 200 and "esamp" not in resp.json()["meta_info"]
    chat = {"model": "any", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4,
            **explore(0.5, group=group)}
    assert requests.post(router.url + "/v1/chat/completions", json=chat, headers={ROUTING_KEY: group},
                         timeout=120).status_code == 200
    assert counters(servers, "mixed_tokens") == mixed
