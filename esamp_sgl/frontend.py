"""``explore=`` in SGLang's frontend language: with router_route (its detour behind SGLang's
router), the only module that touches ``sglang.lang``.

After ``import esamp_sgl``, ``sgl.gen(name, ..., explore=0.5)`` works inside ``@sgl.function``
programs, and ``.run(..., explore=0.5)`` / ``.run_batch(..., explore=0.5)`` set a default.
``explore`` travels as SGLang's own layers carry sampling parameters: the SglGen expression's
SglSamplingParams (api.py → ir.py), the executor's resolution of defaults + overrides
(interpreter.py), and ``to_srt_kwargs()``, which puts ``custom_params.esamp`` into the request.

Groups: every executor has an exploration group; ``s.fork(k)`` gives its k children one new
group (a nested fork, a new one again); ``explore_group="name"`` names a group explicitly to
share it across calls and programs.

SGLang's gen() and run() take fixed keyword lists, so they are wrapped here, once; the wrapping
is written against SGLang 0.5.23's lang/api.py, ir.py and interpreter.py.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import uuid
from typing import Any, Callable

import requests
import sglang
from sglang.lang import api, interpreter, ir
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from esamp_sgl import router_route
from esamp_sgl.params import check_beta, check_group
from esamp_sgl.server_check import esamp_states_in

_run_default: contextvars.ContextVar[float | None] = contextvars.ContextVar("esamp_run_explore", default=None)
_GROUP_ATTR = "esamp_group"


class ExploreUnavailable(RuntimeError):
    """``explore=`` was used against a backend that cannot explore."""


def _check_explore(value: Any) -> float:
    return check_beta(value, math.inf, name="explore")


def gen(name: str | None = None, *args: Any, explore: float | None = None, explore_group: str | None = None,
        **kwargs: Any) -> Any:
    """``sgl.gen`` plus ``explore=β`` (ESamp strength) and ``explore_group=`` (a named group)."""
    if explore is not None:
        explore = _check_explore(explore)
        backend = sglang.global_config.default_backend
        if backend is not None:
            _check_against_server(backend, explore)
    if explore_group is not None:
        check_group(explore_group, name="explore_group")
    expr = _original_gen(name, *args, **kwargs)
    if explore is not None or explore_group is not None:
        if not isinstance(expr, ir.SglGen):
            raise ValueError("explore= applies to generation, not to choices=")
        expr.sampling_params.explore = explore
        expr.sampling_params.explore_group = explore_group
    return expr


def server_max_beta(endpoint: RuntimeEndpoint) -> float:
    """The largest β the server accepts; ExploreUnavailable unless ESamp is active in every
    scheduler (a server without the runtime patch would silently sample plain). Behind SGLang's
    router, every worker it lists is asked, and exploring gens take the router's route
    (router_route). Cached."""
    cached = getattr(endpoint, "_esamp_max_beta", None)
    if cached is not None:
        return cached
    url = endpoint.base_url
    try:
        resp = requests.get(url + "/server_info", timeout=30)
        if resp.status_code == 404 and router_route.is_sglang_router(url):
            endpoint._esamp_via_router = True
            states = [s for worker in router_route.worker_urls(url)
                      for s in _esamp_states(requests.get(worker + "/server_info", timeout=30))]
        else:
            states = _esamp_states(resp)
    except requests.RequestException as e:
        raise ExploreUnavailable(f"cannot ask {url} whether it runs ESamp: {e}") from e
    if not states or not all(s.get("active") for s in states):
        raise ExploreUnavailable(f"explore= needs a server started with `esamp-sgl serve` (ESamp active); "
                                 f"{url} does not run ESamp" + (" on every worker" if _via_router(endpoint) else ""))
    endpoint._esamp_max_beta = min(s["max_beta"] for s in states)
    return endpoint._esamp_max_beta


def _esamp_states(resp: requests.Response) -> list[dict]:
    resp.raise_for_status()
    return esamp_states_in(resp.json())


def _via_router(endpoint: Any) -> bool:
    return getattr(endpoint, "_esamp_via_router", False)


def _endpoint(backend: Any) -> Any:
    return getattr(backend, "endpoint", backend)


def _check_against_server(backend: Any, explore: float) -> None:
    endpoint = _endpoint(backend)
    if not isinstance(endpoint, RuntimeEndpoint):
        raise ExploreUnavailable(f"explore= needs an SGLang server with ESamp (RuntimeEndpoint); "
                                 f"{type(endpoint).__name__} cannot explore")
    check_beta(explore, server_max_beta(endpoint), name="explore")


def _group_of(executor: Any) -> str:
    group = getattr(executor, _GROUP_ATTR, None)
    if group is None:
        group = "sgl-" + executor.sid
        setattr(executor, _GROUP_ATTR, group)
    return group


# --- wrappers around SGLang's frontend ------------------------------------------------------------

def _fork(original: Callable, executor: Any, *args: Any, **kwargs: Any) -> list:
    children = original(executor, *args, **kwargs)
    group = "fork-" + uuid.uuid4().hex
    for child in children:
        setattr(child, _GROUP_ATTR, group)
    return children


def _resolve_sampling_params(original: Callable, executor: Any, sampling_params: Any) -> Any:
    resolved = original(executor, sampling_params)
    explore = getattr(sampling_params, "explore", None)
    if explore is None:
        explore = getattr(executor.default_sampling_para, "explore", None)
    if explore is not None:
        _check_against_server(executor.backend, explore)
        group = getattr(sampling_params, "explore_group", None) or _group_of(executor)
        resolved.esamp = {"beta": explore, "group": group}
    return resolved


def _to_srt_kwargs(original: Callable, params: Any) -> dict:
    kwargs = original(params)
    esamp = getattr(params, "esamp", None)
    if esamp is not None:
        kwargs["custom_params"] = {"esamp": dict(esamp)}
    return kwargs


def _exploring_gens_via(routed: Callable) -> Callable:
    """RuntimeEndpoint.generate / generate_stream: an exploring gen sent to SGLang's router goes
    by ``routed`` (router_route), everything else by SGLang's own route."""

    def around(original: Callable, endpoint: Any, s: Any, sampling_params: Any) -> Any:
        if getattr(sampling_params, "esamp", None) is not None and _via_router(endpoint):
            return routed(endpoint, s, sampling_params)
        return original(endpoint, s, sampling_params)

    return around


def _run_with_explore(original: Callable, function: Any, *args: Any, explore: float | None = None, **kwargs: Any) -> Any:
    """SglFunction.run / run_batch with an ``explore=`` default for every gen in the program."""
    if explore is not None:
        explore = _check_explore(explore)
    token = _run_default.set(explore)
    try:
        return original(function, *args, **kwargs)
    finally:
        _run_default.reset(token)


def _program_with_default(original: Callable, *args: Any, **kwargs: Any) -> Any:
    """run_program / run_program_batch: attach the run's explore default to its sampling defaults."""
    explore = _run_default.get()
    if explore is not None:
        default = inspect.signature(original).bind(*args, **kwargs).arguments["default_sampling_para"]
        default.explore = explore
    return original(*args, **kwargs)


def _around(owner: Any, name: str, around: Callable) -> None:
    original = getattr(owner, name)
    if getattr(original, "__esamp_wrapped__", False):
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return around(original, *args, **kwargs)

    wrapper.__esamp_wrapped__ = True
    setattr(owner, name, wrapper)


def install() -> None:
    """Wrap SGLang's frontend once (idempotent)."""
    global _original_gen
    if getattr(api.gen, "__esamp_wrapped__", False):
        return
    _original_gen = api.gen
    gen.__esamp_wrapped__ = True
    api.gen = gen
    sglang.gen = gen
    _around(interpreter.StreamExecutor, "fork", _fork)
    _around(interpreter.StreamExecutor, "_resolve_sampling_params", _resolve_sampling_params)
    _around(ir.SglSamplingParams, "to_srt_kwargs", _to_srt_kwargs)
    _around(RuntimeEndpoint, "generate", _exploring_gens_via(router_route.generate))
    _around(RuntimeEndpoint, "generate_stream", _exploring_gens_via(router_route.generate_stream))
    _around(ir.SglFunction, "run", _run_with_explore)
    _around(ir.SglFunction, "run_batch", _run_with_explore)
    _around(interpreter, "run_program", _program_with_default)
    _around(interpreter, "run_program_batch", _program_with_default)


_original_gen: Callable = api.gen
