"""The README's main job: `esamp-sgl demo` on SmolLM2 on CPU, at a reduced size."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import SERVER_ENV


def test_demo_prints_both_methods(smollm2_path):
    out = subprocess.run([sys.executable, "-m", "esamp_sgl.cli", "demo", "--problems", "2", "--k", "2"],
                         capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k not in SERVER_ENV})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout.split("method | ")[1]
    assert "plain |" in table and "explore=0.5 |" in table
    assert "majority accuracy" in out.stdout
