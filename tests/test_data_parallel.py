"""Data parallel (``--dp-size 2``, tiny model): every request of a group reaches the one DP rank
its group hashes to (runtime_patch.hooks.route_group_to_dp_rank), so the group has one
distiller; groups spread over the ranks."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime_patch.hooks import group_dp_rank
from tests.conftest import LaunchedRouter, launch
from tests.server_helpers import GREEDY, PROMPTS, all_esamp_stats, complete_in_group, explore, post
from tests.test_scale_out import FLAGS, ROUTER_FLAGS

RANKS = 2
GROUPS = [f"dp-group-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_path):
    yield from launch(tiny_model_path, "esamp-tiny-dp2", *FLAGS, "--dp-size", str(RANKS))


def generate(server, text: str, routed_dp_rank: int | None = None, **sampling) -> dict | list:
    body = {"text": text, "sampling_params": sampling}
    if routed_dp_rank is not None:
        body["routed_dp_rank"] = routed_dp_rank
    return post(server, "/generate", body).json()


def groups_created_by_rank(server) -> dict[int, int]:
    """/server_info lists the DP ranks' states in no fixed order: keyed by each one's dp_rank."""
    return {s["dp_rank"]: s["groups_created"] for s in all_esamp_stats(server)}


def test_every_group_lives_on_one_rank_and_groups_spread(server):
    expected = {g: group_dp_rank(g, RANKS) for g in GROUPS}
    assert set(expected.values()) == set(range(RANKS))  # the names cover both ranks
    before = groups_created_by_rank(server)
    jobs = [(g, PROMPTS[i % 3]) for g in GROUPS for i in range(3)]  # each group: 3 separate requests
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda job: generate(server, job[1], temperature=1.0, max_new_tokens=6,
                                                  **explore(0.5, group=job[0])), jobs))
    served = {}
    for (group, _), out in zip(jobs, outs):
        served.setdefault(group, set()).add(out["meta_info"]["esamp"]["dp_rank"])
    assert served == {g: {rank} for g, rank in expected.items()}
    after = groups_created_by_rank(server)
    assert {r: after[r] - before[r] for r in after} == {r: list(expected.values()).count(r) for r in range(RANKS)}


def test_n_samples_stay_on_one_rank(server):
    outs = generate(server, PROMPTS[0], temperature=1.0, max_new_tokens=6, n=4, **explore(0.5))
    assert len({o["meta_info"]["esamp"]["group"] for o in outs}) == 1
    assert len({o["meta_info"]["esamp"]["dp_rank"] for o in outs}) == 1


def test_a_request_that_pins_its_rank_keeps_it(server):
    group = GROUPS[0]
    other = 1 - group_dp_rank(group, RANKS)
    out = generate(server, PROMPTS[0], routed_dp_rank=other, temperature=1.0, max_new_tokens=4,
                   **explore(0.5, group=group))
    assert out["meta_info"]["esamp"]["dp_rank"] == other


def test_router_dp_aware_keeps_each_group_on_one_rank(server):
    """SGLang's router with --dp-aware in front of the DP 2 server: a routing key is pinned to one
    DP rank (the router injects it into the body; a pinned rank is kept), so the group the key
    names is created once, on one rank (a group split over the ranks would be created on both)."""
    groups = [f"dp-router-{uuid.uuid4().hex}" for _ in range(4)]
    before = groups_created_by_rank(server)
    with LaunchedRouter([server.url], "--dp-aware", *ROUTER_FLAGS, name="router-dp-aware", ranks=RANKS) as router:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda job: complete_in_group(router.url, job[1], job[0], 4),
                          [(g, p) for g in groups for p in PROMPTS[:2]]))
    after = groups_created_by_rank(server)
    assert sum(after[r] - before[r] for r in after) == len(groups)


def test_beta_zero_is_plain_on_every_rank(server):
    for rank in range(RANKS):
        for prompt in PROMPTS:
            plain = generate(server, prompt, routed_dp_rank=rank, **GREEDY)["output_ids"]
            assert generate(server, prompt, routed_dp_rank=rank, **GREEDY, **explore(0.0))["output_ids"] == plain
