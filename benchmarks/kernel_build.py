"""The fused distill-and-mix kernel built for NVIDIA GPUs, on a machine without one.

Triton's compiler and the CUDA tools in the triton wheel (ptxas, cuobjdump) need no GPU. For each
target (sm_80: A100, sm_90: H100/H200, sm_100: B200), hidden size, distiller rank and dtype, this
calls ``distill_mix_triton`` as the decode path does, with the launch turned into Triton's
just-in-time compile for that target (the same specialization, block sizes and options a GPU
would get), and reads the resource use of the cubin ptxas made: registers per thread, spilled
bytes (local memory), shared memory. It runs no kernel: whether the kernel is right is for the
interpreter tests and a GPU to say, whether it is fast for a GPU.
Run:
  .venv/bin/python benchmarks/kernel_build.py [--targets 80 90 100] [--dims 576 4096] [--ranks 32]
      [--dtypes bfloat16]
Writes benchmarks/results/kernel_build.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIMS = (576, 3584, 4096, 5120, 8192)  # SmolLM2-135M, Qwen2.5-7B, Llama-3-8B, Qwen2.5-32B, Llama-3-70B
RANKS = (8, 32, 128)
TARGETS = (80, 90, 100)
DTYPES = ("bfloat16", "float16")

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_build compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402  (after the check: Triton reads TRITON_INTERPRET when kernels are defined)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import esamp_sgl.kernels.distill_mix as distill_mix  # noqa: E402
from esamp_sgl.benchmarks.results_io import save_result  # noqa: E402
from esamp_sgl.config import ESampConfig  # noqa: E402
from esamp_sgl.distiller import DistillerBank  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _TargetOnly:
    """What Triton's JIT asks the active driver before it compiles (Triton 3.x): a device, its
    stream, and its target. The JIT launch path is used unchanged with warmup=True, which compiles
    and does not launch, so no CUDA driver is touched."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


class _CompileInsteadOfLaunch:
    """Stands in for the kernel object: ``kernel[grid](*args)`` compiles for the active target."""

    def __init__(self, kernel: JITFunction) -> None:
        self.jit = JITFunction(kernel.fn)  # a fresh JIT: its compile caches are per device, not per target
        self.built: list = []

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.built.append(self.jit.run(*args, grid=grid, warmup=True, **kwargs))


@contextmanager
def compiling_for(capability: int) -> Iterator[_CompileInsteadOfLaunch]:
    """Within it, distill_mix_triton compiles for ``capability`` instead of launching."""
    real = distill_mix._distill_mix_kernel
    stand_in = _CompileInsteadOfLaunch(real)
    # Triton 3.x keeps the active driver in driver._active; on a machine without a GPU its default
    # (which reset_active would restore) cannot even be created, so the previous value is put back.
    previous = driver._active
    driver.set_active(_TargetOnly(capability))
    distill_mix._distill_mix_kernel = stand_in
    try:
        yield stand_in
    finally:
        distill_mix._distill_mix_kernel = real
        driver._active = previous


def resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's resource use of the kernel in ``cubin``: REG, STACK, SHARED, LOCAL, ..."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        path.write_bytes(cubin)
        listing = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(path)], capture_output=True,
                                 text=True, check=True).stdout
    line = listing[listing.index("Function _distill_mix_kernel"):]
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line.splitlines()[1])}


def build(capability: int, d: int, rank: int, dtype: str) -> dict:
    bank = DistillerBank(2, d, ESampConfig(init="random", rank=rank), device=torch.device("cpu"))
    rows = torch.randn(3, d, dtype=getattr(torch, dtype))
    with compiling_for(capability) as kernel:
        distill_mix.distill_mix_triton(bank.params, rows, rows, torch.tensor([0, 1, -1]), torch.tensor([1.0, 0.5, 0.0]))
    (built,) = kernel.built
    usage = resource_usage(built.asm["cubin"])
    return {"target": f"sm_{capability}", "d": d, "rank": rank, "dtype": dtype,
            "registers": usage["REG"], "local_bytes": usage["LOCAL"], "stack_bytes": usage["STACK"],
            "static_shared_bytes": usage["SHARED"], "dynamic_shared_bytes": built.metadata.shared,
            "warps": built.metadata.num_warps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--out", type=Path, help="write here instead of benchmarks/results/kernel_build.json")
    args = parser.parse_args()
    builds = []
    for capability in args.targets:
        for d in args.dims:
            for rank in args.ranks:
                for dtype in args.dtypes:
                    b = build(capability, d, rank, dtype)
                    builds.append(b)
                    print(f"{b['target']:>6} d={d:5d} r={rank:3d} {dtype:8s} {b['registers']:3d} registers, "
                          f"{b['local_bytes']} B spilled, {b['static_shared_bytes'] + b['dynamic_shared_bytes']} B "
                          f"shared, {b['warps']} warps")
    result = {"triton": triton.__version__, "builds": builds}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    else:
        save_result("kernel_build", result)


if __name__ == "__main__":
    main()
