"""Shared fixtures: real SGLang servers on loopback, one model per test module.

A server at work takes a core (idle, it sleeps: --sleep-on-idle is a CPU default) and these
machines have two, so servers are module-scoped (one module's alive at a time) rather than
session-scoped. Server logs are kept under
``tests/.logs/`` and their tail is shown when startup fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter. Triton reads the flag
# when kernels (its own standard library included) are decorated, so it is set here, before any
# test module imports triton; servers started by the tests do not inherit it (see launch()).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import cache_root, default_tiny_model, resolve, write_tiny_model

LOG_DIR = Path(__file__).parent / ".logs"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return default_tiny_model()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve("smollm2-135m")


# TRITON_INTERPRET is for the kernels tested in this process, not for the servers.
SERVER_ENV: dict[str, str | None] = {"TRITON_INTERPRET": None}


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child process the test starts, less what SERVER_ENV
    unsets (the flags meant for this process only)."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_ENV} | overrides


def start_server(model: Path, name: str, *flags: str, env: dict[str, str | None] | None = None) -> LaunchedServer:
    return LaunchedServer(str(model), flags, log_path=LOG_DIR / f"{name}.log", env={**SERVER_ENV, **(env or {})})


def launch(model: Path, name: str, *flags: str, env: dict[str, str | None] | None = None) -> Iterator[LaunchedServer]:
    with launch_side_by_side((model, name, *flags), env=env) as (server,):
        yield server


@contextmanager
def launch_side_by_side(*specs: tuple, env: dict[str, str | None] | None = None) -> Iterator[list[LaunchedServer]]:
    """Servers started at once, one per ``(model, name, *flags)``, each with ``env``: their
    startups (mostly one core's imports and loading) overlap. If one fails, the others are
    stopped and its error raised. On exit they are told to stop (``stop_soon``)."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(start_server, *spec, env=env) for spec in specs]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        if len(started) < len(specs):
            raise next(f.exception() for f in futures if f.exception() is not None)
        yield started
    finally:
        stop_soon(*started)


_stopping: list[LaunchedServer] = []


def stop_soon(*servers: LaunchedServer) -> None:
    """Tell ``servers`` to stop and go on: SGLang takes ≈ 5 s to shut a server down (its
    watchdog's poll), far less than the next server takes to start, so the suite does not wait
    for each; ``_stopped_servers_reaped`` waits for them all at the end."""
    for server in servers:
        server.terminate()
        _stopping.append(server)


@pytest.fixture(scope="session", autouse=True)
def _stopped_servers_reaped() -> Iterator[None]:
    yield
    for server in _stopping:
        server.stop()


@pytest.fixture(scope="session")
def tiny_gemma2_path() -> Path:
    """Tied embeddings, √d-scaled embeddings and final-logit softcapping (see write_tiny_model)."""
    return write_tiny_model(cache_root() / "models" / "tiny-gemma2-v520", arch="gemma2", layers=2)


class LaunchedRouter:
    """SGLang's router (sglang-router, the `router` extra) in front of ``workers``, on loopback;
    ready once it lists every worker as healthy (it registers them in the background; with
    ``--dp-aware``, each of a worker's ``ranks`` DP ranks as a worker of its own)."""

    def __init__(self, workers: list[str], *flags: str, name: str = "router", ranks: int = 1,
                 timeout: float = 120.0) -> None:
        import subprocess
        import sys
        import time

        import requests

        from esamp_sgl.launcher import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        LOG_DIR.mkdir(exist_ok=True)
        self._log = open(LOG_DIR / f"{name}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1], "--worker-urls", *workers, *flags,
             # its metrics listener defaults to 0.0.0.0:29000: one router at a time, off loopback
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the router exited; see " + self._log.name
            try:
                listed = requests.get(self.url + "/workers", timeout=5).json().get("workers", [])
                if len(listed) == len(workers) * ranks and all(w["is_healthy"] for w in listed):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the router did not list {len(workers) * ranks} healthy workers in {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()

    def __enter__(self) -> "LaunchedRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
