"""``explore=`` in SGLang programs, against real servers (tiny model)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

import esamp_sgl
from esamp_sgl.launcher import LaunchedServer
from tests.conftest import launch_side_by_side


@sgl.function
def forked(s, question, k):
    s += question
    forks = s.fork(k)
    forks += sgl.gen("answer", max_tokens=6, temperature=1.0, explore=0.5)
    s["groups"] = [f.get_meta_info("answer")["esamp"]["group"] for f in forks]
    s["mixed"] = [(f.get_meta_info("answer")["esamp"]["tokens_mixed"], f.get_meta_info("answer")["completion_tokens"])
                  for f in forks]


@sgl.function
def nested(s):
    s += "Start:"
    outer = s.fork(2)
    outer += esamp_sgl.gen("first", max_tokens=3, explore=1.0)
    inner = outer[0].fork(2)
    inner += esamp_sgl.gen("second", max_tokens=3, explore=1.0)
    s["outer"] = [f.get_meta_info("first")["esamp"]["group"] for f in outer]
    s["inner"] = [f.get_meta_info("second")["esamp"]["group"] for f in inner]


@sgl.function
def plain_gen(s):
    s += "Hello"
    s += sgl.gen("out", max_tokens=4, temperature=1.0)


@sgl.function
def named(s, group):
    s += "Tell me"
    s += sgl.gen("x", max_tokens=3, explore=0.5, explore_group=group)
    s += sgl.gen("y", max_tokens=3, explore=0.5)


@pytest.fixture(scope="module")
def servers(tiny_model_path) -> Iterator[list[LaunchedServer]]:
    """(plain, ESamp), started side by side."""
    with launch_side_by_side((tiny_model_path, "frontend-plain", "--no-esamp"),
                             (tiny_model_path, "frontend-esamp")) as started:
        yield started


def test_explore_against_a_server_without_esamp_fails_loudly(servers):
    plain = servers[0]
    state = plain_gen.run(explore=0.5, backend=RuntimeEndpoint(plain.url))
    assert isinstance(state.error(), esamp_sgl.ExploreUnavailable)
    assert "esamp-sgl serve" in str(state.error())
    plain.stop()  # the rest of the module needs only the ESamp server


@pytest.fixture(scope="module")
def backend(servers):
    endpoint = RuntimeEndpoint(servers[1].url)
    sgl.set_default_backend(endpoint)
    yield endpoint
    sgl.set_default_backend(None)


def test_forks_share_one_group_and_every_token_is_mixed(backend):
    state = forked.run("What is 2 + 2?", 4)
    assert state.error() is None
    assert len(set(state["groups"])) == 1 and len(state["groups"]) == 4
    assert all(mixed == produced > 0 for mixed, produced in state["mixed"])
    other = forked.run("What is 2 + 2?", 2)
    assert set(other["groups"]) != set(state["groups"])  # a new fork, a new group


def test_nested_forks_get_their_own_group(backend):
    state = nested.run()
    assert state.error() is None
    assert len(set(state["outer"])) == 1 and len(set(state["inner"])) == 1
    assert state["outer"][0] != state["inner"][0]


def test_explore_as_a_run_default(backend):
    explored = plain_gen.run(explore=0.5)
    assert explored.get_meta_info("out")["esamp"]["beta"] == 0.5
    assert "esamp" not in plain_gen.run().get_meta_info("out")
    batch = plain_gen.run_batch([{}, {}], explore=1.0)
    assert [s.get_meta_info("out")["esamp"]["beta"] for s in batch] == [1.0, 1.0]


def test_a_named_group_is_shared_across_programs(backend):
    first, second = named.run("shared-g"), named.run("shared-g")
    assert first.get_meta_info("x")["esamp"]["group"] == "shared-g" == second.get_meta_info("x")["esamp"]["group"]
    assert first.get_meta_info("y")["esamp"]["group"] != "shared-g"


def test_streaming_with_explore(backend):
    state = plain_gen.run(explore=0.5, stream=True)
    text = "".join(state.text_iter("out"))
    meta = state.get_meta_info("out")
    assert text and meta["esamp"]["tokens_mixed"] == meta["completion_tokens"] > 0


@pytest.mark.parametrize("value,match", [(-0.1, ">= 0"), (float("nan"), ">= 0"), ("high", "a number"),
                                         (True, "a number"), (4.5, "server's maximum")])
def test_bad_explore_fails_in_the_client_naming_explore(backend, value, match):
    with pytest.raises(ValueError, match=f"explore must be .*{match}"):
        sgl.gen("x", explore=value)


@pytest.mark.parametrize("group", ["", 7, "g" * 257])
def test_bad_explore_group_fails_in_the_client_naming_it(backend, group):
    with pytest.raises(ValueError, match="explore_group must be a non-empty string of at most 256"):
        sgl.gen("x", explore=0.5, explore_group=group)


def test_non_sglang_backends_are_refused(backend):
    class OtherBackend:
        pass

    sgl.set_default_backend(OtherBackend())
    try:
        with pytest.raises(esamp_sgl.ExploreUnavailable, match="cannot explore"):
            sgl.gen("x", explore=0.5)
    finally:
        sgl.set_default_backend(backend)


def test_programs_run_end_to_end(backend):
    from programs import best_of_n, creative_fanout, self_consistency, tree_of_thought
    from programs.common import addition_problems

    problems = addition_problems(2)
    sc = self_consistency.solve(problems, k=3, explore=0.5, max_tokens=8, progress=False)
    assert [len(r["answers"]) for r in sc] == [3, 3]
    assert all(m["esamp"]["tokens_mixed"] == m["completion_tokens"] for r in sc for m in r["meta"])
    bon = best_of_n.solve(problems, n=2, explore=0.5, max_tokens=8, progress=False)
    assert all(set(r["verdicts"]) <= {"yes", "no"} and len(r["answers"]) == 2 for r in bon)
    tot = tree_of_thought.solve(problems[:1], breadth=2, explore=0.5, max_tokens=6, progress=False)
    assert len(tot[0]["leaves"]) == 4
    drafts = creative_fanout.fan_out("Write.", n=3, explore=0.5, max_tokens=8)
    assert len(drafts) == 3 and all(d["novelty"] > 0 for d in drafts)
