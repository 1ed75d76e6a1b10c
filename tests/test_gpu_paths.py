"""The GPU checks of tests/gpu_checks.py under pytest (skipped without CUDA), and the script that
runs them on a bare GPU machine, exercised here: without CUDA it reports so and exits 0. Without
CUDA the Triton checks still run, their kernel in Triton's interpreter (the lane and decode-step
checks run in tests/test_stream_sim.py, against a model of CUDA streams)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import gpu_checks
from tests.gpu_checks import CHECKS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: needs a CUDA device")
@pytest.mark.parametrize("name", list(CHECKS))
def test_gpu_check(name):
    CHECKS[name]()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, test_gpu_check runs them compiled")
@pytest.mark.parametrize("name", [name for name in CHECKS if name.startswith("triton_kernel")])
def test_triton_check_under_the_interpreter(name, monkeypatch):
    """The check's own code at its shapes and dtypes (fp16/bf16, d = 576 and 4096), the kernel in
    Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)."""
    monkeypatch.setattr(gpu_checks, "CUDA", torch.device("cpu"))
    CHECKS[name]()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, test_gpu_check runs them on the GPU")
@pytest.mark.parametrize("name", [name for name in CHECKS if name.startswith("base_")])
def test_base_build_check_on_the_cpu(name, monkeypatch):
    """The base-build checks' own code, on the CPU: the training on both devices, and a child
    that builds from a tiny Llama in bf16 with the project's packages bare, as on the GPU
    machine (what only the GPU shows, the memory given back, is left out)."""
    monkeypatch.setattr(gpu_checks, "CUDA", torch.device("cpu"))
    CHECKS[name]()


def test_gpu_check_script_runs_without_sglang_and_reports(tmp_path):
    out = tmp_path / "gpu_check.json"
    # The GPU machine has no SGLang: make importing it fail in the script's interpreter.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nclass _NoSGLang:\n    def find_spec(self, name, path=None, target=None):\n"
                       "        if name == 'sglang' or name.startswith('sglang.'):\n"
                       "            raise ImportError('no SGLang on the GPU machine')\n"
                       "sys.meta_path.insert(0, _NoSGLang())\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out)], env=env, check=True,
                   timeout=300, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["cuda"] is False and set(report["checks"]) == set(CHECKS)
    assert all(entry["status"] == "skipped" for entry in report["checks"].values())
    dry_run = report["overhead_cpu_dry_run"]["batches"]  # the 7B timing's code, at toy shapes
    assert set(dry_run) == {"1", "16"} and all(row["training_steps"] > 0 for row in dry_run.values())
    masks = report["overhead_cpu_dry_run"]["candidate_masks"]["ms"]
    assert set(masks) == {"1", "16"} and all(len(paths) == 4 and min(paths.values()) > 0 for paths in masks.values())


HANGING_RUN = """
import argparse, importlib.util, sys, time
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
def waits_for_an_event_nobody_records():
    time.sleep(60)
checks = {"finishes": lambda: None, "skipped_one": lambda: 1 / 0, "hangs": waits_for_an_event_nobody_records,
          "never_reached": lambda: None}
args = argparse.Namespace(only="", skip=["skipped"], check_timeout=1.0, out=sys.argv[2])
gpu_check.run_checks(checks, args, {"checks": {}})
"""


def test_a_hanging_check_ends_the_run_with_its_stack_and_a_report_that_names_it(tmp_path):
    """On the device every second counts: a check stuck past --check-timeout ends the run, with
    the stack of where it waits, and the report keeps what finished and names what hung."""
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-c", HANGING_RUN, str(ROOT / "scripts" / "gpu_check.py"), str(out)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 1, run.stderr
    assert "waits_for_an_event_nobody_records" in run.stderr  # faulthandler's stack dump
    checks = json.loads(out.read_text())["checks"]
    assert checks["finishes"]["status"] == "passed" and checks["hangs"]["status"] == "running"
    assert "skipped_one" not in checks and "never_reached" not in checks
