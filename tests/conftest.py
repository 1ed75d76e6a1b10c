"""Shared fixtures: real SGLang servers on loopback, one model per test module.

Each server's scheduler busy-polls a core and these machines have two, so servers are
module-scoped (one alive at a time) rather than session-scoped. Server logs are kept under
``tests/.logs/`` and their tail is shown when startup fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter. Triton reads the flag
# when kernels (its own standard library included) are decorated, so it is set here, before any
# test module imports triton; servers started by the tests do not inherit it (see launch()).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import cache_root, resolve, write_tiny_model

LOG_DIR = Path(__file__).parent / ".logs"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return write_tiny_model(cache_root() / "models" / "tiny-llama-v520")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve("smollm2-135m")


# TRITON_INTERPRET is for the kernels tested in this process, not for the servers.
SERVER_ENV: dict[str, str | None] = {"TRITON_INTERPRET": None}


def start_server(model: Path, name: str, *flags: str, env: dict[str, str | None] | None = None) -> LaunchedServer:
    return LaunchedServer(str(model), flags, log_path=LOG_DIR / f"{name}.log", env={**SERVER_ENV, **(env or {})})


def launch(model: Path, name: str, *flags: str, env: dict[str, str | None] | None = None) -> Iterator[LaunchedServer]:
    with start_server(model, name, *flags, env=env) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_gemma2_path() -> Path:
    """Tied embeddings, √d-scaled embeddings and final-logit softcapping (see write_tiny_model)."""
    return write_tiny_model(cache_root() / "models" / "tiny-gemma2-v520", arch="gemma2", layers=2)
