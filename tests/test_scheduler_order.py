"""ESamp under SGLang's overlap scheduler, which SGLang 0.5.23 runs on CPU as well (its
server_info says ``disable_overlap_schedule: false`` here). That scheduler launches step t+1
before it processes step t's result: a request that finishes at t still has a row in t+1, and
a batch with a grammar is sampled only after the forward's hooks have ended. A small KV pool
makes SGLang retract running requests and resume them later.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import launch
from tests.server_helpers import GREEDY, PROMPTS, esamp_stats, explore, gen

HALFLIFE = 8
KV_TOKENS = 512  # fewer than the concurrent requests below need: some are retracted


@pytest.fixture(scope="module")
def server(tiny_model_path):
    yield from launch(tiny_model_path, "esamp-tiny-order", "--esamp-init", "random",
                      "--esamp-beta-halflife", str(HALFLIFE), "--max-total-tokens", str(KV_TOKENS))


def test_the_overlap_scheduler_is_on(server):
    assert requests.get(server.url + "/server_info", timeout=30).json()["disable_overlap_schedule"] is False


def test_the_row_after_a_requests_last_token_is_not_trained(server):
    first = gen(server, PROMPTS[0], **GREEDY, **explore(1e-4))["output_ids"][0]
    before = esamp_stats(server)
    out = gen(server, PROMPTS[0], temperature=0, max_new_tokens=8, stop_token_ids=[first], **explore(1e-4))
    after = esamp_stats(server)
    assert out["meta_info"]["completion_tokens"] == out["meta_info"]["esamp"]["tokens_mixed"] == 1
    # the step launched before the stop was seen held the request's row: dropped from training
    assert after["post_stop_rows_dropped"] - before["post_stop_rows_dropped"] == 1


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_seeds_hold_in_batches_sampled_after_the_forward(server, beta):
    sampled = {"temperature": 1.0, "max_new_tokens": 6, "regex": "[0-9]{5}"}
    same = {gen(server, "Number: ", **sampled, **explore(beta, seed=7))["text"] for _ in range(2)}
    others = {gen(server, "Number: ", **sampled, **explore(beta, seed=s))["text"] for s in (8, 9, 10)}
    assert len(same) == 1 and others - same


def test_a_retracted_request_keeps_its_beta_schedule(server):
    n_tokens = 96
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(gen, server, f"{PROMPTS[i % 3]} {i}", temperature=1.0, max_new_tokens=n_tokens,
                               ignore_eos=True, **explore(2.0, debug=True)) for i in range(8)]
        outs = [f.result() for f in futures]
    log = server.log_tail(2_000_000)
    assert "retract" in log.lower()  # the pool was too small: SGLang retracted and resumed requests
    want = pytest.approx([2.0 * 0.5 ** (i / HALFLIFE) for i in range(n_tokens)])
    for out in outs:
        assert [step["beta"] for step in out["meta_info"]["esamp_debug"]] == want
    assert esamp_stats(server)["requests_exploring"] == 0
