"""The post-filter's top-k / top-p candidate mask: one top-k selection against a sort of the
whole vocabulary, on CPU, for the rows that explore in one decode step.

Per (rows, vocabulary, top_k): candidate_mask with the host-side bound on top_k (selection) and
without it (sort), timed alternately in one process, median of --repeats; top_p = 0.95 and
temperature 0.8 throughout, so the top-p rule runs on both. The two masks are checked equal
first. Run:
  .venv/bin/python benchmarks/candidate_mask.py [--rows 1 16 64] [--repeats 15]
Writes benchmarks/results/candidate_mask.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.mix import candidate_mask

VOCABS = (49152, 151936)  # SmolLM2, Qwen2.5
TOP_KS = (20, 50, 1024)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rows: int, vocab: int, top_k: int, repeats: int) -> dict:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + top_k)) * 4
    args = (logits, torch.full((rows,), top_k), torch.full((rows,), 0.95), torch.zeros(rows), torch.full((rows,), 0.8))
    sort = lambda: candidate_mask(*args)  # noqa: E731
    select = lambda: candidate_mask(*args, max_top_k=top_k)  # noqa: E731
    assert torch.equal(sort(), select())
    times: dict[str, list[float]] = {"sort": [], "select": []}
    for _ in range(repeats):
        times["sort"].append(timed(sort))
        times["select"].append(timed(select))
    sort_s, select_s = statistics.median(times["sort"]), statistics.median(times["select"])
    return {"rows": rows, "vocab": vocab, "top_k": top_k, "sort_ms": 1e3 * sort_s, "select_ms": 1e3 * select_s,
            "select_over_sort": select_s / sort_s}


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
                print(f"V={vocab:6d} rows={rows:3d} top_k={top_k:4d}  sort {m['sort_ms']:8.2f} ms  "
                      f"select {m['select_ms']:7.2f} ms  ratio {m['select_over_sort']:.3f}")
    save_result("candidate_mask", {"top_p": 0.95, "temperature": 0.8, "repeats": args.repeats, "measured": measured})


if __name__ == "__main__":
    main()
