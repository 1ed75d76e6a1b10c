"""Saving benchmark results: every JSON carries the command that produced it and the machine."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def save_result(name: str, result: dict) -> Path:
    record = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        **result,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"saved {path}")
    return path
