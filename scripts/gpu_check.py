"""Run tests/gpu_checks.py on a machine with one CUDA GPU and only torch + triton installed (no
SGLang, no pytest, no network), and write a JSON report. Without CUDA it says so, runs what it
can — that every check imports (the CPU references are the test suite's) — and exits 0.

Also times ESamp against a Llama-7B-shaped decode step (benchmarks/gpu_overhead.py).

Usage: python scripts/gpu_check.py [--out REPORT.json] [--only SUBSTRING] [--skip SUBSTRING ...]
    [--check-timeout SECONDS]

A check that hangs (a wait on an event no stream records, say) does not eat the device's time: past
--check-timeout its threads' stacks are printed and the process exits 1; the report keeps the checks
finished before it and names the one that hung ("running"). Rerun with --skip NAME to go past it.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bare_packages  # noqa: E402


def load_without_package_inits() -> types.ModuleType:
    """tests/gpu_checks.py with esamp_sgl, runtime_patch and tests as bare namespaces
    (scripts/bare_packages.py)."""
    bare_packages.register(ROOT)
    spec = importlib.util.spec_from_file_location("tests.gpu_checks", ROOT / "tests" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests.gpu_checks"] = module
    spec.loader.exec_module(module)
    importlib.import_module("runtime_patch.hooks")  # what the checks drive, importable without SGLang
    return module


def load_overhead_benchmark() -> types.ModuleType:
    """benchmarks/gpu_overhead.py (after load_without_package_inits: it imports esamp_sgl's core)."""
    spec = importlib.util.spec_from_file_location("gpu_overhead", ROOT / "benchmarks" / "gpu_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")


@contextmanager
def watchdog(report: dict, args: argparse.Namespace) -> Iterator[None]:
    """Past --check-timeout, print every thread's stack and exit 1 (a thread stuck in a CUDA wait
    cannot be interrupted; the watchdog is faulthandler's own thread). The report is written
    first, so it holds what finished and what was running."""
    write(report, args.out)
    faulthandler.dump_traceback_later(args.check_timeout, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def selected(name: str, args: argparse.Namespace) -> bool:
    return args.only in name and not any(skip in name for skip in args.skip)


def run_checks(checks: dict, args: argparse.Namespace, report: dict) -> None:
    for name, check in checks.items():
        if not selected(name, args):
            continue
        report["checks"][name] = {"status": "running", "timeout_s": args.check_timeout}
        start = time.perf_counter()
        with watchdog(report, args):
            try:
                check()
                entry = {"status": "passed"}
            except Exception:
                entry = {"status": "failed", "error": traceback.format_exc()}
        entry["seconds"] = round(time.perf_counter() - start, 3)
        report["checks"][name] = entry
        write(report, args.out)  # a run stopped at its time limit keeps what it finished
        print(f"{entry['status']:>7}  {entry['seconds']:7.2f} s  {name}", flush=True)
        if entry["status"] == "failed":  # the whole stack: the op that synced is the deepest frame
            print(entry["error"], flush=True)


def run_overhead(overhead: types.ModuleType, args: argparse.Namespace, report: dict) -> None:
    """The Llama-7B-shaped timing (benchmarks/gpu_overhead.py), under the watchdog; a failure is
    reported, and the checks after it still run."""
    start = time.perf_counter()
    report["overhead_llama7b"] = {"status": "running", "timeout_s": args.check_timeout}
    with watchdog(report, args):
        try:
            report["overhead_llama7b"] = overhead.measure()
        except Exception:
            report["overhead_llama7b"] = {"status": "failed", "error": traceback.format_exc()}
            print("overhead_llama7b failed:\n" + report["overhead_llama7b"]["error"], flush=True)
            return
    report["overhead_llama7b"]["seconds"] = round(time.perf_counter() - start, 1)
    for batch, row in report["overhead_llama7b"]["batches"].items():
        print(f"batch {batch:>3}: decode {row['decode_step_ms']:.2f} ms, with ESamp {row['with_esamp_ms']:.2f} ms"
              f" ({row['overhead']:+.2%})", flush=True)
    for batch, paths in report["overhead_llama7b"]["candidate_masks"]["ms"].items():
        print(f"batch {batch:>3} candidate masks (ms): "
              + ", ".join(f"{name} {ms:.3f}" for name, ms in paths.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    # on the device machine only $OUT comes back
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else \
        ROOT / "benchmarks" / "results" / "gpu_check.json"
    parser.add_argument("--out", default=str(default_out))
    parser.add_argument("--only", default="", help="run only the checks whose name holds this")
    parser.add_argument("--skip", action="append", default=[], help="skip the checks whose name holds this")
    parser.add_argument("--check-timeout", type=float, default=180.0,
                        help="seconds one check may run before its stacks are printed and the run ends")
    args = parser.parse_args()
    import torch

    checks = load_without_package_inits().CHECKS
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
                    "python": platform.python_version(), "cuda": torch.cuda.is_available(), "checks": {}}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    overhead = load_overhead_benchmark()
    if not torch.cuda.is_available():
        report["note"] = ("no CUDA device: the GPU checks were imported, not run; the overhead measurement ran "
                          "on the CPU at toy shapes (it exercises the code, its figures say nothing about a GPU)")
        report["checks"] = {name: {"status": "skipped"} for name in checks}
        report["overhead_cpu_dry_run"] = overhead.measure(torch.device("cpu"), overhead.TINY, batches=(1, 16), steps=2)
    else:
        report["device"] = torch.cuda.get_device_name()
        sanitized = {name for name in checks if name.startswith("csan:")}
        run_checks({n: c for n, c in checks.items() if n not in sanitized}, args, report)
        if selected("overhead_llama7b", args):
            run_overhead(overhead, args, report)
        # Last: the CUDA sanitizer's trace callbacks stay on once it is imported, and would slow
        # the timing above.
        run_checks({n: c for n, c in checks.items() if n in sanitized}, args, report)
    write(report, args.out)
    failed = [n for n, e in report["checks"].items() if e["status"] == "failed"]
    if report.get("overhead_llama7b", {}).get("status") == "failed":
        failed.append("overhead_llama7b")
    print(f"gpu_check: cuda={report['cuda']} passed={sum(e['status'] == 'passed' for e in report['checks'].values())} "
          f"failed={len(failed)} -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
