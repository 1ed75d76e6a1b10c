"""Build and run the SGLang server command behind ``esamp-sgl serve``.

Every SGLang flag is passed through unchanged. ``--esamp-*`` flags (one per ESampConfig field)
configure ESamp, which is on unless ``--no-esamp`` is given; the config reaches every process
SGLang spawns through the ESAMP_SGL_CONFIG environment variable, read by the runtime patch.
Where there is no GPU, CPU defaults observed to work on these machines are added for flags the
user did not set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from esamp_sgl.config import ENV_VAR, ESampConfig
from esamp_sgl.models import resolve

# Flags (and values) that make SGLang 0.5.23 run on a CPU without AMX and without sgl_kernel's
# CPU build: torch-native attention, the pytorch sampler, no CUDA graphs, a bounded KV pool
# (unbounded, the CPU pool took 15.5 GB), and float32 (the CPU paths are tested in fp32).
# --sleep-on-idle: an idle scheduler otherwise busy-polls a core, one that the model's forward (or
# a second server's startup, or the client) needs on a CPU host; SGLang's idle sleeper wakes on the
# next request's message, so requests wait no longer.
CPU_DEFAULTS: dict[str, str | None] = {
    "--sleep-on-idle": None,
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
# Tensor parallel on CPU (gloo): PyPI's torch carries NCCL, so SGLang would also build an NCCL
# communicator, which fails without a GPU; a library path that does not load makes it skip that.
CPU_TP_ENV = {"SGLANG_NCCL_SO_PATH": "/nonexistent/esamp-sgl-no-nccl-on-cpu.so"}
# Decode CUDA graphs capture ESamp's step with the model (runtime_patch/hooks.py joins SGLang's
# capture hooks). A prefill graph would replay an extend without ESamp's last-token mix and
# warm-up, which run on the host's per-request view of the batch: ESamp keeps prefill eager.
GPU_ESAMP_DEFAULTS: dict[str, str | None] = {"--cuda-graph-backend-prefill": "disabled"}
# Under TP each rank samples from its own copy of the logits, and SGLang (to save an all-reduce)
# trusts the copies to agree. A failure ESamp contains on one rank after the step's all-reduce
# (that rank's rows then served plain) would break that and set the ranks' schedulers apart; with
# this the ranks agree on each sampled token (SGLang's sampler: the minimum over the ranks).
ESAMP_TP_ENV = {"SYNC_TOKEN_IDS_ACROSS_TP": "1"}


@dataclass(frozen=True)
class ServerLaunch:
    command: list[str]
    env: dict[str, str]
    esamp: ESampConfig | None


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _esamp_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--no-esamp", action="store_true")
    defaults = ESampConfig()
    for f in fields(ESampConfig):
        default = getattr(defaults, f.name)
        parser.add_argument("--esamp-" + f.name.replace("_", "-"), dest=f.name, type=type(default), default=default)
    return parser


def esamp_flag_help() -> str:
    defaults = ESampConfig()
    return "  ".join(f"--esamp-{f.name.replace('_', '-')} (default {getattr(defaults, f.name)})" for f in fields(ESampConfig))


def split_esamp_args(args: Sequence[str]) -> tuple[ESampConfig | None, list[str]]:
    """(ESamp config or None for --no-esamp, the remaining SGLang flags)."""
    ns, rest = _esamp_parser().parse_known_args(list(args))
    if ns.no_esamp:
        return None, rest
    return ESampConfig(**{f.name: getattr(ns, f.name) for f in fields(ESampConfig)}), rest


def _size(args: Sequence[str], *flags: str) -> int:
    """A parallelism degree given under any of its SGLang spellings (1 if absent)."""
    values = [_value(args, f) for f in flags]
    return max([int(v) for v in values if v is not None], default=1)


def tp_size(args: Sequence[str]) -> int:
    return _size(args, "--tp-size", "--tensor-parallel-size")


def dp_size(args: Sequence[str]) -> int:
    return _size(args, "--dp-size", "--data-parallel-size")


def server_gpus(args: Sequence[str]) -> list[int]:
    """The GPU ordinals a server uses: SGLang's --base-gpu-id plus --gpu-id-step for each of its
    TP × DP ranks."""
    base, step = int(_value(args, "--base-gpu-id") or 0), int(_value(args, "--gpu-id-step") or 1)
    return [base + i * step for i in range(tp_size(args) * dp_size(args))]


# SGLang 0.5.23 models whose EAGLE3 layer capture hands over something other than the residual
# stream after the layer: Gemma 3 appends the layer's last MLP output (its residual travels
# apart), not the state the base distiller is trained on (found by tests/test_families.py).
# Models without the capture at all are refused by the scheduler (capture_layer).
CAPTURE_IS_NOT_THE_RESIDUAL = ("Gemma3ForCausalLM",)


def _architecture(args: Sequence[str]) -> str | None:
    config = Path(_value(args, "--model-path") or "") / "config.json"
    return (json.loads(config.read_text()).get("architectures") or [None])[0] if config.is_file() else None


def _refuse_unsupported(args: Sequence[str], esamp: ESampConfig) -> None:
    arch = _architecture(args)
    if arch is not None and arch.endswith("ForConditionalGeneration"):
        # SGLang's Gemma 3 wrapper holds its text model as `language_model` (ESamp reads
        # `model.embed_tokens`), and transformers' has no `model.norm` for the base distiller: a
        # clear refusal now, not a failure after loading the weights twice.
        raise ValueError(f"ESamp serves text-only causal language models (…ForCausalLM); {arch} is a "
                         "multimodal or encoder-decoder checkpoint. Serve a text-only checkpoint of the "
                         "model, or --no-esamp.")
    if esamp.source_layer is not None and arch in CAPTURE_IS_NOT_THE_RESIDUAL:
        raise ValueError(f"--esamp-source {esamp.source}: {arch}'s layer capture in SGLang is not the residual "
                         "stream after the layer; use --esamp-source embed.")
    for flag in ("--pp-size", "--pipeline-parallel-size"):
        if _size(args, flag) > 1:
            raise ValueError(f"ESamp cannot run with pipeline parallelism ({flag} {_value(args, flag)}): its "
                             "shallow state is read from the first stage and mixed before the LM head on the "
                             "last. Use tensor or data parallelism, or --no-esamp.")
    for flag in ("--enable-dp-attention", "--enable-dp-lm-head"):
        if _given(args, flag):
            raise ValueError(f"ESamp's post-filter projects ĥ beside h in the LM head's own pass, which "
                             f"data-parallel attention splits per rank ({flag}); use --dp-size, or --no-esamp.")
    if _size(args, "--attn-dp-size") > 1:
        raise ValueError("ESamp cannot run with data-parallel attention (--attn-dp-size > 1); use --dp-size, "
                         "or --no-esamp.")
    if _given(args, "--speculative-algorithm"):
        raise ValueError("ESamp cannot run with speculative decoding (--speculative-algorithm); use --no-esamp.")
    if esamp.init == "svd" and tp_size(args) > 1:
        raise ValueError("--esamp-init svd reads the model's last MLP, which tensor parallelism shards "
                         "(--tp-size > 1); use --esamp-init base or random.")


def cpu_threads_bind(ranks: int, cores: Sequence[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for ``ranks`` scheduler processes on ``cores``: disjoint
    contiguous ranges where there are enough cores, else one core each, shared round-robin.
    (Unset, SGLang binds one rank per NUMA node and refuses more ranks than nodes.)"""
    cores = sorted(cores)
    if ranks <= len(cores):
        width = len(cores) // ranks
        chunks = [cores[i * width:(i + 1) * width] for i in range(ranks)]
        return "|".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)
    return "|".join(str(cores[i % len(cores)]) for i in range(ranks))


def build_launch(model: str | None, args: Sequence[str], *, cpu: bool | None = None) -> ServerLaunch:
    """The ``python -m sglang.launch_server ...`` command and environment for ``esamp-sgl serve``."""
    esamp, args = split_esamp_args(args)
    if model is not None:
        if _given(args, "--model-path"):
            raise ValueError("give the model either as --model or as --model-path, not both")
        args = ["--model-path", str(resolve(model))] + args
    elif not _given(args, "--model-path"):
        raise ValueError("no model: pass --model NAME_OR_PATH (e.g. smollm2-135m) or --model-path")
    on_cpu = not has_gpu() if cpu is None else cpu
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    defaults: dict[str, str | None] = {}
    if on_cpu:
        defaults.update(CPU_DEFAULTS)
        env.update(CPU_ENV)
        ranks = tp_size(args) * dp_size(args)
        if ranks > 1:
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_threads_bind(ranks, os.sched_getaffinity(0)))
        if tp_size(args) > 1:
            for key, value in CPU_TP_ENV.items():
                env.setdefault(key, value)
    if esamp is not None:
        _refuse_unsupported(args, esamp)
        env[ENV_VAR] = esamp.to_env()
        if tp_size(args) > 1:
            for key, value in ESAMP_TP_ENV.items():
                env.setdefault(key, value)
        if not on_cpu:
            defaults.update(GPU_ESAMP_DEFAULTS)
    for flag, value in defaults.items():
        if not _given(args, flag):
            args += [flag] if value is None else [flag, value]
    return ServerLaunch([sys.executable, "-m", "sglang.launch_server", *args], env, esamp)


def prepare(launch: ServerLaunch) -> None:
    """What must exist before the server starts: with ``--esamp-init base``, the model's base
    distiller (pre-trained on first use in a child process that exits before the server
    starts, in the serving dtype; then cached)."""
    if launch.esamp is None or launch.esamp.init != "base":
        return
    from esamp_sgl.base_distiller import base_path, build_in_child, local_model_dir, serving_dtype

    model_path = local_model_dir(_value(launch.command, "--model-path"))
    path = base_path(model_path, launch.esamp)
    if not path.is_file():
        print(f"esamp-sgl: pre-training the base distiller for {model_path} (once; cached at {path.parent})",
              file=sys.stderr, flush=True)
    stats = build_in_child(model_path, launch.esamp, serving_dtype(model_path, _value(launch.command, "--dtype")),
                           server_gpus(launch.command) if has_gpu() else None)
    print(f"esamp-sgl: base distiller {path.name}: held-out relative error "
          f"{stats.held_out_relative_error:.3f} on {stats.rows} rows", file=sys.stderr, flush=True)


def serve(model: str | None, args: Sequence[str]) -> int:
    """Run the server in the foreground; with ESamp on, stop it if ESamp is not active in it."""
    from esamp_sgl.server_check import EsampNotActive, wait_until_esamp_ready

    launch = build_launch(model, args)
    prepare(launch)
    print("esamp-sgl serve:", " ".join(launch.command), file=sys.stderr, flush=True)
    process = subprocess.Popen(launch.command, env=launch.env)
    if launch.esamp is not None:
        url = f"http://{_value(launch.command, '--host') or '127.0.0.1'}:{_value(launch.command, '--port') or 30000}"
        try:
            wait_until_esamp_ready(url, process, timeout=600.0)
            print(f"esamp-sgl serve: ESamp active in every scheduler at {url}", file=sys.stderr, flush=True)
        except EsampNotActive as e:
            print(f"esamp-sgl serve: error: {e}; stopping the server", file=sys.stderr, flush=True)
            process.terminate()
            process.wait(timeout=60)
            return 1
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        time.sleep(0.5)
        return process.wait()
