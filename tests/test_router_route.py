"""How an exploring gen travels through SGLang's router (esamp_sgl.router_route): the request
body it becomes and the meta_info it gives back. The real router: tests/test_scale_out.py."""

from __future__ import annotations

import pytest
from sglang.lang.ir import SglSamplingParams

from esamp_sgl.router_route import RouterRouteError, completion_body, meta_info_of

ESAMP = {"esamp": {"beta": 0.5, "group": "fork-1"}}


def srt_kwargs(**params) -> dict:
    return {**SglSamplingParams(**params).to_srt_kwargs(), "custom_params": ESAMP}


def test_the_body_carries_the_gen_under_completions_names():
    body = completion_body("Q: 1 + 1 =", srt_kwargs(max_new_tokens=5, min_new_tokens=1, stop=["\n"], temperature=0.7,
                                                    top_k=8, min_p=0.05, regex="[0-9]+"))
    assert body["prompt"] == "Q: 1 + 1 ="
    assert (body["max_tokens"], body["min_tokens"], body["stop"]) == (5, 1, ["\n"])
    assert (body["temperature"], body["top_k"], body["min_p"], body["regex"]) == (0.7, 8, 0.05, "[0-9]+")
    assert body["custom_params"] == ESAMP
    assert "max_new_tokens" not in body and "n" not in body and "json_schema" not in body


@pytest.mark.parametrize("field, params", [("n", {"n": 2}), ("stop_regex", {"stop_regex": "x+"}),
                                           ("return_logprob", {"return_logprob": True})])
def test_what_completions_cannot_carry_is_refused_naming_it(field, params):
    with pytest.raises(RouterRouteError, match=field):
        completion_body("Q:", {**srt_kwargs(), **params})


def test_meta_info_has_the_finish_reason_counts_and_esamp_summary():
    summary = {"group": "fork-1", "beta": 0.5, "tokens_mixed": 3, "mean_novelty": 0.4, "dp_rank": 0}
    response = {"id": "c1", "choices": [{"text": " 2", "finish_reason": "stop", "matched_stop": "\n"}],
                "usage": {"prompt_tokens": 6, "completion_tokens": 3}, "metadata": {"esamp": [summary]}}
    assert meta_info_of(response) == {"id": "c1", "finish_reason": {"type": "stop", "matched": "\n"},
                                      "prompt_tokens": 6, "completion_tokens": 3, "esamp": summary}
    plain = {**response, "metadata": {"weight_version": "default"}}  # served plain: no summary
    assert "esamp" not in meta_info_of(plain)
