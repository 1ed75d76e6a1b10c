"""`esamp-sgl serve`'s preparation builds the base distiller in a child process, in the serving
dtype, and caches it outside the model directory: the serving process's memory is back near
its baseline after the build (on a GPU, the build's model and logits would otherwise stay
reserved beside the server), and the model directory is left as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from esamp_sgl.base_distiller import serving_dtype

PREPARE_AND_MEASURE = """
import json, sys
from esamp_sgl.serve import build_launch, prepare
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
launch = build_launch(sys.argv[1], ["--esamp-init", "base"])
modules, before = set(sys.modules), rss_mib()
prepare(launch)
loaded = sorted(m for m in set(sys.modules) - modules if m.startswith("transformers.models."))
print(json.dumps({"before": before, "after": rss_mib(), "model_modules_loaded": loaded}))
"""


def _listing(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_the_build_runs_in_a_child_and_leaves_the_model_directory_alone(tiny_model_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    untouched = _listing(model)
    env = {**os.environ, "ESAMP_SGL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", PREPARE_AND_MEASURE, str(model)], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["model_modules_loaded"] == []  # the model was never loaded in the serving process
    assert measured["after"] - measured["before"] < 64  # MiB
    assert list((tmp_path / "cache" / "base-distillers").glob("*/esamp-base-embed-r32.safetensors"))
    assert _listing(model) == untouched


def test_the_build_takes_the_serving_dtype(tiny_model_path):
    assert serving_dtype(tiny_model_path, "float32") == "float32"
    assert serving_dtype(tiny_model_path, "half") == "float16"
    assert serving_dtype(tiny_model_path, "bfloat16") == "bfloat16"
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert serving_dtype(tiny_model_path, "auto") == (config.get("torch_dtype") or config["dtype"])  # no GPU here


def test_a_float32_checkpoint_is_built_in_what_sglang_serves_it_in_on_a_gpu(tmp_path):
    for model_type, served in (("llama", "float16"), ("qwen2", "float16"), ("gemma2", "bfloat16")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "torch_dtype": "float32"}))
        assert serving_dtype(tmp_path, "auto", on_gpu=True) == served
        assert serving_dtype(tmp_path, None, on_gpu=False) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    assert serving_dtype(tmp_path, "auto", on_gpu=True) == "bfloat16"
