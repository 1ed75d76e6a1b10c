"""The post-filter's top-k / top-p candidate mask without a sort of the vocabulary against the
sort, on CPU, for the rows that explore in one decode step.

Per (rows, vocabulary, top_k): candidate_mask with the host-side bound on top_k and without it
(the sort), timed alternately in one process, median of --repeats. With a top_k the bound makes
it one top-k selection; with none (SGLang's TOP_K_ALL) top-p's threshold is found by bisection.
top_p = 0.95 and temperature 0.8 throughout, so the top-p rule runs on every path. The masks are
checked equal first. Run:
  .venv/bin/python benchmarks/candidate_mask.py [--rows 1 16 64] [--repeats 15]
Writes benchmarks/results/candidate_mask.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.mix import TOP_K_ALL, candidate_mask

VOCABS = (49152, 151936)  # SmolLM2, Qwen2.5
TOP_KS = (20, 50, 1024, None)  # None: no top-k limit


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rows: int, vocab: int, top_k: int | None, repeats: int) -> dict:
    bound = TOP_K_ALL if top_k is None else top_k
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + (top_k or 0))) * 4
    args = (logits, torch.full((rows,), bound), torch.full((rows,), 0.95), torch.zeros(rows), torch.full((rows,), 0.8))
    sort = lambda: candidate_mask(*args)  # noqa: E731
    unsorted = lambda: candidate_mask(*args, max_top_k=bound)  # noqa: E731
    assert torch.equal(sort(), unsorted())
    times: dict[str, list[float]] = {"sort": [], "unsorted": []}
    for _ in range(repeats):
        times["sort"].append(timed(sort))
        times["unsorted"].append(timed(unsorted))
    sort_s, unsorted_s = statistics.median(times["sort"]), statistics.median(times["unsorted"])
    return {"rows": rows, "vocab": vocab, "top_k": top_k, "path": "bisection" if top_k is None else "selection",
            "sort_ms": 1e3 * sort_s, "unsorted_ms": 1e3 * unsorted_s, "unsorted_over_sort": unsorted_s / sort_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    measured = []
    for vocab in VOCABS:
        for rows in args.rows:
            for top_k in TOP_KS:
                m = measure(rows, vocab, top_k, args.repeats)
                measured.append(m)
                print(f"V={vocab:6d} rows={rows:3d} top_k={top_k or '-':>4}  sort {m['sort_ms']:8.2f} ms  "
                      f"{m['path']} {m['unsorted_ms']:7.2f} ms  ratio {m['unsorted_over_sort']:.3f}")
    save_result("candidate_mask", {"top_p": 0.95, "temperature": 0.8, "repeats": args.repeats, "measured": measured})


if __name__ == "__main__":
    main()
