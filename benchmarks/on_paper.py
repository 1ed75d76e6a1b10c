"""ESamp's cost per decode step at 7B and 70B under tensor parallelism, computed (not run: no
such model fits these machines) from the shapes of the work ESamp does in this build.

Per tensor-parallel rank, next to the model's share of one decode step: the distiller bank held
(the ranks share the groups out: a rank holds ⌈groups / tp⌉, esamp_sgl/shard.py), FLOPs and bytes
of ESamp's step (distiller forward for the mix, the training step on the lane, the rows'
snapshots; counted for every row of the batch, an upper bound: a rank predicts and trains only
its own groups' rows), the all-reduce of ĥ that sharding adds, and the post-filter's share of the
LM-head pass (ĥ projected beside h: extra GEMM rows, no second read of the head's weights, but
twice the logits rows to all-gather over the vocabulary). Beside the bytes, what they would be
with a bank replicated on every rank.

Usage: .venv/bin/python benchmarks/on_paper.py → results/on_paper.json and a markdown table.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.config import ESampConfig, bytes_per_group


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float  # parameters
    d: int  # hidden size
    vocab: int
    layers: int
    kv_dim: int  # key/value width per layer (GQA heads × head dim)


MODELS = (ModelShape("Qwen2.5-7B", 7.6e9, 3584, 152064, 28, 512),
          ModelShape("Llama-3-70B", 70.6e9, 8192, 128256, 80, 1024))
WEIGHT_BYTES = 2  # bf16 weights and activations
LOGIT_BYTES = 4  # SGLang's logits are fp32 after the LM head
BANK_BYTES = 4  # ESamp's distillers are fp32


def esamp_step(d: int, rank: int, rows: int, groups: int, cfg: ESampConfig) -> tuple[float, float]:
    """(FLOPs, bytes) of one ESamp decode step on one rank whose bank holds ``groups`` of the
    step's groups, for ``rows`` rows."""
    forward = rows * (3 * 2 * d * rank + 12 * d)  # x·A, x·G, (·)·B + LayerNorm and the mix
    flops = 3 * forward  # the mix's forward, the training step's forward + backward (≈ 2×)
    weights = groups * bytes_per_group(d, cfg, BANK_BYTES) * 3  # read for the mix, read + write by the update
    activations = rows * d * BANK_BYTES * 6  # x, h, ĥ, h_mix and the training snapshot's x, h
    return flops, weights + activations


def model_step(m: ModelShape, rows: int, tp: int, context: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step of the model on one TP rank: weights read once, each
    row's KV cache read once, 2 FLOPs per parameter per row (attention's FLOPs left out)."""
    kv = rows * context * m.layers * 2 * m.kv_dim * WEIGHT_BYTES
    return 2 * m.params * rows / tp, (m.params * WEIGHT_BYTES + kv) / tp


def post_filter(m: ModelShape, rows: int, tp: int) -> dict:
    """What projecting ĥ beside h in the LM head's pass adds on one rank."""
    return {"lm_head_extra_flops": 2 * m.d * (m.vocab / tp) * rows,
            "lm_head_extra_weight_bytes": 0,
            "all_gather_extra_bytes": rows * m.vocab * LOGIT_BYTES * (tp - 1) / tp}


def table(tp: int, live_groups: int, ranks: list[int], batches: list[int], context: int) -> list[dict]:
    rows_out = []
    for m in MODELS:
        for rank in ranks:
            cfg = ESampConfig(rank=rank)
            for batch in batches:
                model_flops, model_bytes = model_step(m, batch, tp, context)
                for layout, groups in (("forks of 8", max(1, batch // 8)), ("one group per row", batch)):
                    in_step = min(groups, live_groups)
                    # A rank's step touches its ⌈groups / tp⌉ groups (round-robin slots balance them).
                    flops, nbytes = esamp_step(m.d, rank, batch, math.ceil(in_step / tp), cfg)
                    _, replicated = esamp_step(m.d, rank, batch, in_step, cfg)
                    all_reduce = batch * m.d * BANK_BYTES * 2 * (tp - 1) / tp  # ring: ĥ [B, d] fp32
                    pf = post_filter(m, batch, tp)
                    rows_out.append({
                        "model": m.name, "tp": tp, "rank": rank, "batch": batch, "layout": layout,
                        "groups_in_step": in_step,
                        "bank_bytes_per_rank": math.ceil(live_groups / tp) * bytes_per_group(m.d, cfg, BANK_BYTES),
                        "model_weight_bytes_per_rank": m.params * WEIGHT_BYTES / tp,
                        "esamp_flops": flops, "model_flops_per_rank": model_flops,
                        "esamp_bytes": nbytes, "model_bytes_per_rank": model_bytes,
                        "flops_share": flops / model_flops, "bytes_share": nbytes / model_bytes,
                        "bytes_share_if_bank_replicated": replicated / model_bytes,
                        "h_hat_all_reduce_bytes": all_reduce, "h_hat_all_reduce_share": all_reduce / model_bytes,
                        **pf, "all_gather_share": pf["all_gather_extra_bytes"] / model_bytes,
                    })
    return rows_out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | r | B | groups/step | bank per rank | ESamp FLOPs share | ESamp bytes share | "
             "ESamp bytes share, bank replicated | ĥ all-reduce share | post-filter all-gather share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rank']} | {r['batch']} | {r['groups_in_step']} ({r['layout']}) | "
                     f"{r['bank_bytes_per_rank'] / 2**20:,.0f} MiB | {100 * r['flops_share']:.3f}% | "
                     f"{100 * r['bytes_share']:.2f}% | {100 * r['bytes_share_if_bank_replicated']:.2f}% | "
                     f"{100 * r['h_hat_all_reduce_share']:.2f}% | "
                     f"{100 * r['all_gather_share']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--live-groups", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--context", type=int, default=2048, help="tokens of KV cache each row reads")
    args = parser.parse_args()
    rows = table(args.tp, args.live_groups, args.ranks, args.batches, args.context)
    print(markdown(rows))
    save_result("on_paper", {"computed": True, "tp": args.tp, "live_groups": args.live_groups,
                             "context": args.context, "rows": rows})


if __name__ == "__main__":
    main()
