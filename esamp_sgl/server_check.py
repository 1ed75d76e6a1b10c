"""Waiting for a launched SGLang server, and proving ESamp is active in it.

SGLang only logs a plugin or hook that fails to load, and then serves plain samples. A server
started with ESamp on is therefore not called ready until (1) every scheduler reports ESamp
active with all of its hooks applied (``/server_info``), and (2) the main process refuses a bad
``esamp.beta`` with HTTP 400 — the request-side hooks are in place.
"""

from __future__ import annotations

import subprocess
import time

import requests


class ServerNotReady(RuntimeError):
    pass


class EsampNotActive(ServerNotReady):
    pass


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerNotReady(f"server exited with {process.returncode}")
        try:
            if requests.get(url + "/health_generate", timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise ServerNotReady(f"server not healthy after {timeout:.0f}s")


def esamp_states(url: str) -> list[dict]:
    """The ``esamp`` entry of every scheduler's internal state (one per DP rank)."""
    return esamp_states_in(requests.get(url + "/server_info", timeout=30).json())


def esamp_states_in(info: dict) -> list[dict]:
    """The ``esamp`` entries of a /server_info answer already read."""
    return [state.get("esamp", {}) for state in info.get("internal_states", [])]


def check_esamp_active(url: str) -> dict:
    """Raise EsampNotActive unless every scheduler runs ESamp and the main process validates its
    parameters; returns the /server_info answer it read."""
    info = requests.get(url + "/server_info", timeout=30).json()
    states = esamp_states_in(info)
    if not states or not all(s.get("active") for s in states):
        raise EsampNotActive(f"ESamp is not active in every scheduler (server_info esamp: {states}); "
                             "the server log says which plugin or hook failed")
    resp = requests.post(url + "/generate", json={"text": "probe", "sampling_params": {
        "max_new_tokens": 1, "custom_params": {"esamp": {"beta": -1}}}}, timeout=60)
    if resp.status_code != 400 or "esamp.beta" not in resp.text:
        raise EsampNotActive("the main process does not validate esamp parameters (its plugin hooks are "
                             f"missing): a bad esamp.beta got HTTP {resp.status_code}")
    return info


def wait_until_esamp_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    wait_healthy(url, process, timeout)
    check_esamp_active(url)
