"""Build and run the SGLang server command behind ``esamp-sgl serve``.

Every SGLang flag is passed through unchanged. Where there is no GPU, CPU defaults that were
observed to work on these machines are added for flags the user did not set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from esamp_sgl.models import resolve

# Flags (and values) that make SGLang 0.5.23 run on a CPU without AMX and without sgl_kernel's
# CPU build: torch-native attention, the pytorch sampler, no CUDA graphs, a bounded KV pool
# (unbounded, the CPU pool took 15.5 GB), and float32 (the CPU paths are tested in fp32).
CPU_DEFAULTS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--disable-cuda-graph": None,
    "--dtype": "float32",
    "--max-total-tokens": "16384",
    "--mem-fraction-static": "0.5",
    "--host": "127.0.0.1",
}
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}  # without it rotary embedding reaches vllm ops


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(model: str | None, sglang_args: Sequence[str], *, cpu: bool | None = None) -> list[str]:
    """The ``python -m sglang.launch_server ...`` argv for a model name/path plus SGLang flags."""
    args = list(sglang_args)
    if model is not None:
        if _given(args, "--model-path"):
            raise ValueError("give the model either as --model or as --model-path, not both")
        args = ["--model-path", str(resolve(model))] + args
    elif not _given(args, "--model-path"):
        raise ValueError("no model: pass --model NAME_OR_PATH (e.g. smollm2-135m) or --model-path")
    if has_gpu() if cpu is None else not cpu:
        return [sys.executable, "-m", "sglang.launch_server", *args]
    for flag, value in CPU_DEFAULTS.items():
        if not _given(args, flag):
            args += [flag] if value is None else [flag, value]
    return [sys.executable, "-m", "sglang.launch_server", *args]


def server_env(*, cpu: bool | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if not (has_gpu() if cpu is None else not cpu):
        env.update(CPU_ENV)
    return env


def serve(model: str | None, sglang_args: Sequence[str]) -> int:
    """Run the server in the foreground until it exits; returns its exit code."""
    cmd = server_command(model, sglang_args)
    print("esamp-sgl serve:", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=server_env())
