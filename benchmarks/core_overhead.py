"""ESamp's per-decode-step cost on CPU next to a measured SmolLM2 decode step, and at d = 4096
as computed FLOPs and bytes next to a 7B-class decode step.

Per batch size B: time of one ESamp step (the lane's owed training step + distiller forward +
mix + snapshot for training) and of one SmolLM2-135M decode step (transformers, fp32, B rows,
KV cache of CONTEXT tokens), measured alternately in the same process; reported as a ratio.
Rows are split into forks of 8 (one group per 8 rows).

Run: .venv/bin/python benchmarks/core_overhead.py [--batches 1 4 16 64 256] [--repeats 5]
Writes benchmarks/results/core_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.config import ESampConfig, bytes_per_group
from esamp_sgl.distiller import DistillerBank, RowGroups
from esamp_sgl.lane import DeferredLane
from esamp_sgl.latent_step import distill_and_mix
from esamp_sgl.models import resolve

CONTEXT = 64
FORK = 8


def esamp_step(lane: DeferredLane, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor, beta: torch.Tensor) -> None:
    """What the server does per decode step on CPU: owed training, grouped distiller + mix, snapshot."""
    lane.begin_step()
    distill_and_mix(lane.bank.params, x, h, slot, beta, groups=RowGroups.of(slot, x.device))
    lane.submit(x, h, slot)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batches: list[int], repeats: int, cfg: ESampConfig) -> list[dict]:
    model = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32).eval()
    d = model.config.hidden_size
    rows = []
    for b in batches:
        groups = max(1, b // FORK)
        bank = DistillerBank(groups, d, cfg)
        lane = DeferredLane(bank, cfg.staleness)
        x, h = torch.randn(b, d), torch.randn(b, d)
        slot = torch.arange(b) // FORK
        beta = torch.full((b,), 0.5)
        with torch.no_grad():
            prefix = model(torch.randint(0, 1000, (b, CONTEXT)), use_cache=True)
        token = torch.randint(0, 1000, (b, 1))

        def decode() -> None:
            with torch.no_grad():
                cache = prefix.past_key_values
                model(token, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token: the context length stays fixed across repeats

        def esamp() -> None:
            with torch.inference_mode():
                esamp_step(lane, x, h, slot, beta)

        t_decode = median_seconds(decode, repeats)
        t_esamp = median_seconds(esamp, repeats * 3)
        row = {"batch": b, "groups": groups, "esamp_ms": t_esamp * 1e3, "decode_ms": t_decode * 1e3,
               "ratio": t_esamp / t_decode}
        print(f"B={b:4d} groups={groups:3d}  esamp {row['esamp_ms']:8.3f} ms  decode {row['decode_ms']:9.2f} ms  "
              f"ratio {row['ratio']:.4f}", flush=True)
        rows.append(row)
    return rows


def computed_7b(batches: list[int], cfg: ESampConfig) -> list[dict]:
    """FLOPs and bytes of one ESamp step at d = 4096 next to a 7B decode step (2·7e9 FLOPs/row,
    the fp16 weights read once per step)."""
    d, r = 4096, cfg.rank
    out = []
    for b in batches:
        groups = max(1, b // FORK)
        fwd = b * (3 * 2 * d * r + 12 * d)  # A, G, B products + LayerNorm and mix
        flops = fwd * 3  # forward for the mix, forward + backward (≈2×) for training
        weight_bytes = groups * bytes_per_group(d, cfg) * 3  # read (mix), read + write (update)
        row_bytes = b * d * 4 * 6  # x, h, ĥ, h_mix, the snapshot copies
        model_flops, model_bytes = b * 2 * 7e9, 2 * 7e9
        out.append({"batch": b, "esamp_flops": flops, "esamp_bytes": weight_bytes + row_bytes,
                    "flops_ratio": flops / model_flops, "bytes_ratio": (weight_bytes + row_bytes) / model_bytes})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = ESampConfig(init="random")  # the per-step cost does not depend on the initial weights
    torch.manual_seed(0)
    result = {
        "config": {k: getattr(cfg, k) for k in ESampConfig.field_names()},
        "context_tokens": CONTEXT,
        "measured_cpu_d576": measure(args.batches, args.repeats, cfg),
        "computed_d4096_vs_7b": computed_7b(args.batches, cfg),
        "bytes_per_group_d4096": bytes_per_group(4096, cfg),
    }
    for row in result["computed_d4096_vs_7b"]:
        print(f"d=4096 B={row['batch']:4d}  FLOPs ratio {row['flops_ratio']:.5f}  bytes ratio {row['bytes_ratio']:.5f}")
    print(f"bytes per group at d=4096: {result['bytes_per_group_d4096']:,}")
    save_result("core_overhead", result)


if __name__ == "__main__":
    main()
