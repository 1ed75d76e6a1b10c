"""Shared fixtures: real SGLang servers on loopback, one model per test module.

Each server's scheduler busy-polls a core and these machines have two, so servers are
module-scoped (one alive at a time) rather than session-scoped. Server logs are kept under
``tests/.logs/`` and their tail is shown when startup fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import cache_root, resolve, write_tiny_llama

LOG_DIR = Path(__file__).parent / ".logs"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return write_tiny_llama(cache_root() / "models" / "tiny-llama-test")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve("smollm2-135m")


def launch(model: Path, name: str, *extra: str) -> Iterator[LaunchedServer]:
    # Tests of Triton kernels set TRITON_INTERPRET in this process; servers must not inherit it.
    env = {"TRITON_INTERPRET": None}
    with LaunchedServer(str(model), extra, log_path=LOG_DIR / f"{name}.log", env=env) as server:
        yield server
