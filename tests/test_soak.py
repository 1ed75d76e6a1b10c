"""The soak's small form (benchmarks/soak.py) on a real server, tiny model: a mixed load of every
request kind, with disconnects, aborts and bad payloads, leaves nothing lost, nothing 5xx,
nothing exploring, no group live once TTLs pass, and the scheduler's memory near its warm-up size."""

from __future__ import annotations

import pytest

from esamp_sgl.benchmarks.soak import KINDS, SERVER_FLAGS, SLOTS, soak
from tests.conftest import launch

REQUESTS = 200
CLIENTS = 8  # twice the slots: groups are evicted and some requests find every slot held


@pytest.fixture(scope="module")
def result(tiny_model_path):
    for server in launch(tiny_model_path, "esamp-tiny-soak", *SERVER_FLAGS):
        yield soak(server.url, server, requests_total=REQUESTS, clients=CLIENTS, seconds=600)


def test_every_request_gets_one_expected_answer(result):
    mixed = result["exploring_phase"]
    assert mixed["requests"] == result["control_phase"]["requests"] == REQUESTS
    assert result["plain_phase"]["requests"] == result["workload"]["plain_phase_requests"]
    for phase in ("plain_phase", "control_phase", "exploring_phase"):
        assert result[phase]["errors"] == {}, (phase, result[phase]["error_details"])
    assert set(mixed["by_kind"]) == set(KINDS)  # every kind was sent
    assert mixed["outcomes"].get("refused_400") == mixed["by_kind"]["bad"]
    assert mixed["outcomes"].get("ok", 0) > REQUESTS // 2


def test_the_server_ends_with_no_exploring_state_and_bounded_slots(result):
    before, loaded, settled = result["server_before"], result["server_after_load"], result["server_after_ttl"]
    assert loaded["groups_live"] <= SLOTS and loaded["slots_evicted"] > before["slots_evicted"]
    # Requests that found every slot held were served plain (their outcome is plain_no_slot or ok).
    assert loaded["refused_no_slot"] > before["refused_no_slot"]
    assert settled["requests_exploring"] == 0 and settled["groups_live"] == 0
    assert settled["hook_errors"] == before["hook_errors"]
    assert result["plain_request_after"] == "ok"


def test_the_schedulers_memory_stays_near_its_warm_up_size(result):
    assert result["scheduler_rss_bytes"]["exploring_phase"]["after_warmup"] > 0
    assert result["rss_end_over_warmup"] < 1.25
