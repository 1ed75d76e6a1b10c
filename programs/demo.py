"""``esamp-sgl demo``: self-consistency on SmolLM2 on CPU, with and without ``explore``.

Starts an ESamp server, runs the same problems twice (plain sampling, then explore=β), prints a
small table, and stops the server.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import sglang as sgl

from esamp_sgl.runtime import Runtime
from . import self_consistency
from .common import addition_problems


def summarize(records: list[dict], seconds: float) -> dict:
    metas = [m for r in records for m in r["meta"]]
    tokens = sum(m["completion_tokens"] for m in metas)
    novelty = [m["esamp"]["mean_novelty"] for m in metas if "esamp" in m]
    return {
        "majority accuracy": sum(r["correct"] for r in records) / len(records),
        "any fork correct": sum(r["any_correct"] for r in records) / len(records),
        "distinct answers": statistics.mean(len({a for a in r["answers"] if a}) for r in records),
        "mean novelty": statistics.mean(novelty) if novelty else float("nan"),
        "tokens/s": tokens / seconds,
    }


def run_demo(model: str, problems: int = 6, k: int = 4, beta: float = 0.5) -> int:
    log = Path(tempfile.gettempdir()) / "esamp-sgl-demo-server.log"
    print(f"starting an ESamp server for {model} on this machine (log: {log}) ...", flush=True)
    with Runtime(model, log_path=log) as runtime:
        sgl.set_default_backend(runtime.endpoint)
        batch = addition_problems(problems, seed=7)
        rows = {}
        for label, explore in (("plain", None), (f"explore={beta}", beta)):
            print(f"\nself-consistency, {problems} problems × {k} forks, {label}", flush=True)
            start = time.perf_counter()
            records = self_consistency.solve(batch, k=k, explore=explore, num_threads=2)
            rows[label] = summarize(records, time.perf_counter() - start)
            example = records[0]
            print(f"  e.g. {example['question']} → forks said {example['answers']}, vote {example['vote']}")
    columns = list(next(iter(rows.values())))
    print("\n" + " | ".join(["method"] + columns))
    for label, row in rows.items():
        print(" | ".join([label] + [f"{row[c]:.2f}" for c in columns]))
    print("\n(a handful of problems on a 135M model: this shows the mechanics, not a quality result)")
    return 0
