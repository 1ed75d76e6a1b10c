"""Output-token throughput with ESamp on vs off, same SGLang build, same run.

Workload: PROMPTS prompts × FORKS samples each (one n = FORKS request per prompt, all prompts
at once), MAX_TOKENS tokens per sample (ignore_eos), temperature 0.8, SmolLM2-135M on CPU.
Both servers run side by side (--sleep-on-idle) and each round runs three arms, interleaved in a
rotating order so drift on this shared machine hits them alike:
  - plain SGLang: a `--no-esamp` server (the plugin registers nothing);
  - ESamp server: rounds without explore and with explore β = 0.5.
Reported per round as ratios, their median, and the mean with a 90% bootstrap interval over
rounds; and — robust to the machine's noise — ESamp's share of the scheduler's forward time in
explore rounds, from the server's own counters, in total and by part of ESamp's hooks
(``part_seconds``: which part grew, when the share grows). Run:
  .venv/bin/python benchmarks/throughput.py [--rounds 5] [--max-tokens 128] [--recipe NAME]
Writes benchmarks/results/throughput.json (throughput_NAME.json with --recipe).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from esamp_sgl.benchmarks.quality.recipes import RECIPES, recipe_min_p
from esamp_sgl.benchmarks.quality.stats import bootstrap_mean
from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.server_check import esamp_states

PROMPTS = [f"Question {i}: what is {i + 3} + {2 * i + 5}? Think step by step." for i in range(8)]
FORKS = 8


def run_round(url: str, beta: float | None, max_tokens: int, min_p: float = 0.0) -> float:
    """Output tokens per second for one round of the workload."""
    def one(prompt: str) -> int:
        sampling = {"temperature": 0.8, "max_new_tokens": max_tokens, "ignore_eos": True, "n": FORKS, "min_p": min_p}
        if beta is not None:
            sampling["custom_params"] = {"esamp": {"beta": beta}}
        outs = requests.post(url + "/generate", json={"text": prompt, "sampling_params": sampling}, timeout=3600).json()
        return sum(o["meta_info"]["completion_tokens"] for o in outs)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        tokens = sum(pool.map(one, PROMPTS))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="ESamp server recipe (benchmarks/quality/recipes.py); "
                        "default: the server's defaults. Post-filter recipes sample with their min-p.")
    args = parser.parse_args()
    flags = RECIPES[args.recipe] if args.recipe else []
    min_p = recipe_min_p(args.recipe) if args.recipe else 0.0
    logs = Path(tempfile.gettempdir())
    arms = {"plain_server": None, "esamp_server_explore": 0.5, "esamp_server_no_explore": None}
    measured: dict[str, list[float]] = {arm: [] for arm in arms}
    esamp_share: list[float] = []
    part_seconds: dict[str, float] = {}
    forward_seconds = 0.0

    # Both servers stay up (each sleeps while idle) and the arms interleave within every round,
    # in a rotating order, so that the machine's drift hits all three alike.
    idle = ["--sleep-on-idle"]
    with LaunchedServer(args.model, ["--no-esamp", *idle], log_path=logs / "bench-plain.log") as plain:
        started = time.perf_counter()
        with LaunchedServer(args.model, [*flags, *idle], log_path=logs / "bench-esamp.log",
                            startup_timeout=1800) as esamp:
            esamp_startup = time.perf_counter() - started
            for r in range(args.rounds):
                order = list(arms)[r % 3:] + list(arms)[:r % 3]
                for arm in order:
                    url = plain.url if arm == "plain_server" else esamp.url
                    before = esamp_states(esamp.url)[0]
                    measured[arm].append(run_round(url, arms[arm], args.max_tokens, min_p))
                    after = esamp_states(esamp.url)[0]
                    print(f"{arm} round {r}: {measured[arm][-1]:.1f} tok/s", flush=True)
                    if arms[arm] is not None:
                        forward = after["forward_seconds"] - before["forward_seconds"]
                        esamp_share.append((after["esamp_seconds"] - before["esamp_seconds"]) / forward)
                        forward_seconds += forward
                        for part, seconds in after["part_seconds"].items():
                            part_seconds[part] = part_seconds.get(part, 0.0) + seconds - before["part_seconds"][part]
                        print(f"  ESamp's share of forward time: {esamp_share[-1]:.4f}", flush=True)

    def ratios(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(measured[num], measured[den])]

    median = {k: statistics.median(v) for k, v in measured.items()}
    per_round = {
        "ratio_explore_vs_plain_server": ratios("esamp_server_explore", "plain_server"),
        "ratio_explore_vs_no_explore_same_server": ratios("esamp_server_explore", "esamp_server_no_explore"),
        "ratio_no_explore_vs_plain_server": ratios("esamp_server_no_explore", "plain_server"),
    }
    result = {
        "workload": {"prompts": len(PROMPTS), "forks": FORKS, "max_tokens": args.max_tokens, "temperature": 0.8,
                     "min_p": min_p, "beta": 0.5, "model": args.model, "esamp_flags": flags,
                     "server_flags": idle},
        "esamp_server_startup_seconds": esamp_startup,
        "tokens_per_second": measured,
        "median_tokens_per_second": median,
        **{key: statistics.median(values) for key, values in per_round.items()},
        "per_round_ratios": per_round,
        "ratio_mean_and_90pct_bootstrap_interval": {key: bootstrap_mean(values) for key, values in per_round.items()},
        "esamp_share_of_forward_time_explore_rounds": esamp_share,
        "esamp_share_of_forward_time": sum(part_seconds.values()) / forward_seconds,
        "esamp_share_of_forward_time_by_part": {part: seconds / forward_seconds for part, seconds in part_seconds.items()},
    }
    for key, (mean, lo, hi) in result["ratio_mean_and_90pct_bootstrap_interval"].items():
        print(f"{key}: median {result[key]:.4f}, mean {mean:.4f} [{lo:.4f}, {hi:.4f}]")
    print(f"ESamp's share of forward time: {result['esamp_share_of_forward_time']:.4%}")
    for part, share in sorted(result["esamp_share_of_forward_time_by_part"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:>20}: {share:.4%}")
    save_result(f"throughput_{args.recipe}" if args.recipe else "throughput", result)


if __name__ == "__main__":
    main()
