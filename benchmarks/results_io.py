"""Saving benchmark results: every JSON carries the command that produced it and the machine."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def run_metadata() -> dict:
    """The command that is running, the versions it runs with, and the machine."""
    from importlib.metadata import version

    script = sys.argv[0].endswith(".py")
    argv = ([".venv/bin/python", os.path.relpath(sys.argv[0]), *sys.argv[1:]] if script
            else [Path(sys.argv[0]).name, *sys.argv[1:]])
    return {
        "command": " ".join(argv),
        "versions": {name: version(name) for name in ("esamp-sgl", "sglang", "torch", "transformers")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "threads": torch.get_num_threads()},
    }


def save_result(name: str, result: dict) -> Path:
    record = {**run_metadata(), **result}
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path}")
    return path
