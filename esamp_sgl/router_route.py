"""Exploring gens of SGLang programs through SGLang's router (sglang-router 0.3.2).

The router re-serializes ``/generate`` — the route RuntimeEndpoint sends every gen through —
with typed structs that have no ``custom_params``, so ESamp's entry would be dropped and the gen
sampled plain. Its ``/v1/completions`` keeps ``custom_params`` and passes the worker's response
through unchanged. So an exploring gen sent to a router goes out as one ``/v1/completions``
request with its group as the ``X-SMG-Routing-Key`` (``--policy manual``: one key, one worker,
so one distiller per group), and its answer comes back in RuntimeEndpoint's ``(text, meta_info)``
shape, ``meta_info["esamp"]`` taken from the response's metadata
(runtime_patch.hooks.esamp_in_openai_response). Gens that do not explore keep SGLang's route.

This module is that workaround, whole; tests/test_scale_out.py fails once the router carries
``custom_params`` on ``/generate``, and then it can go.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import requests
from sglang.lang.global_config import global_config

ROUTING_KEY = "X-SMG-Routing-Key"  # sglang-router --policy manual: one key, one worker

# SglSamplingParams.to_srt_kwargs() names → SGLang 0.5.23's CompletionRequest names (same meaning)
COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
ROUTED_UNSUPPORTED = ("stop_regex", "return_logprob", "logprob_start_len", "top_logprobs_num",
                      "return_text_in_logprobs")


class RouterRouteError(ValueError):
    """A gen asks for something the router's /v1/completions route cannot carry."""


def is_sglang_router(url: str) -> bool:
    """Whether ``url`` answers as sglang-router does (it has /workers and no /server_info)."""
    try:
        return requests.get(url + "/workers", timeout=10).ok
    except requests.RequestException:
        return False


def worker_urls(url: str) -> list[str]:
    """The router's workers, once each (``--dp-aware`` lists a worker per DP rank as URL@rank)."""
    workers = requests.get(url + "/workers", timeout=10).json().get("workers", [])
    return sorted({re.sub(r"@\d+$", "", w["url"]) for w in workers})


def completion_body(text: str, srt_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The /v1/completions body of one gen: the same prompt text and sampling parameters."""
    unsupported = [k for k in ROUTED_UNSUPPORTED if srt_kwargs.get(k)]  # unset: None, () or False
    if srt_kwargs.get("n", 1) != 1:
        unsupported.append("n")
    if unsupported:
        raise RouterRouteError(f"explore= through SGLang's router cannot carry {unsupported} "
                               f"(it explores through /v1/completions); send this gen to an esamp-sgl server")
    body = {"model": "default", "prompt": text,
            "skip_special_tokens": global_config.skip_special_tokens_in_output,
            "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out}
    for name, value in srt_kwargs.items():
        if value is not None and name not in ROUTED_UNSUPPORTED and name != "n":
            body[COMPLETION_NAMES.get(name, name)] = value
    return body


def meta_info_of(response: dict[str, Any]) -> dict[str, Any]:
    """RuntimeEndpoint's meta_info for a one-choice completion: id, finish reason, token counts
    and ESamp's summary where the choice explored."""
    choice, usage = response["choices"][0], response["usage"]
    finish = None
    if choice.get("finish_reason") is not None:
        finish = {"type": choice["finish_reason"]}
        if choice.get("matched_stop") is not None:
            finish["matched"] = choice["matched_stop"]
    meta = {"id": response["id"], "finish_reason": finish, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}
    summaries = (response.get("metadata") or {}).get("esamp") or [None]
    if summaries[0] is not None:
        meta["esamp"] = summaries[0]
    return meta


def generate(endpoint: Any, s: Any, sampling_params: Any) -> tuple[str, dict[str, Any]]:
    """RuntimeEndpoint.generate for an exploring gen, through the router's /v1/completions."""
    if s.images_:
        raise RouterRouteError("explore= through SGLang's router cannot carry images")
    endpoint._handle_dtype_to_regex(sampling_params)
    srt_kwargs = sampling_params.to_srt_kwargs()
    # RuntimeEndpoint sends the logprob fields beside sampling_params, not in to_srt_kwargs();
    # gathered here so that completion_body refuses each one set, by its name
    srt_kwargs.update({k: getattr(sampling_params, k, None) for k in ROUTED_UNSUPPORTED})
    headers = {ROUTING_KEY: sampling_params.esamp["group"]}
    if endpoint.api_key is not None:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    resp = requests.post(endpoint.base_url + "/v1/completions", json=completion_body(s.text_, srt_kwargs),
                         headers=headers, timeout=None,
                         verify=True if endpoint.verify is None else endpoint.verify)
    if resp.status_code != 200:
        raise RuntimeError(resp.text)
    body = resp.json()
    return body["choices"][0]["text"], meta_info_of(body)


def generate_stream(endpoint: Any, s: Any, sampling_params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """RuntimeEndpoint.generate_stream for an exploring gen through the router: the whole answer
    as one chunk (the completions response carries ESamp's summary only when not streamed)."""
    yield generate(endpoint, s, sampling_params)
