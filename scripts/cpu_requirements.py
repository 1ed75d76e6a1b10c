"""Print the requirements that make the pinned SGLang usable on a CPU-only machine.

SGLang's wheel pins a CUDA torch and ~25 CUDA-only packages. On CPU we install SGLang itself
with ``--no-deps`` and then its own Requires-Dist list minus those packages, read from the
installed metadata so the list follows the pinned SGLang version. The project's own
dependencies (pyproject.toml) are added, minus sglang itself.

Usage: python scripts/cpu_requirements.py PYPROJECT > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import requires

from packaging.requirements import Requirement

# CUDA-only, GPU-kernel, or heavyweight packages that the text-generation path on CPU never
# imports. torch and torchvision are installed separately, at the versions setup.sh pins.
CUDA_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|torch[-_]memory[-_]saver|timm|flashinfer.*|"
    r"flash[-_]attn.*|sglang[-_]kernel|sgl[-_].*|quack.*|tilelang|nvidia[-_].*|cuda[-_]python|"
    r"nvshmem4py.*|kernels|humming[-_]kernels|modelscope|py[-_]spy)$",
    re.IGNORECASE,
)


def _wanted(line: str, extras: set[str]) -> Requirement | None:
    req = Requirement(line)
    env = {"extra": ""}
    if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
        return None
    if CUDA_ONLY.match(req.name):
        return None
    req.marker = None
    req.extras = set()  # e.g. flashinfer_python[cu13]: extras name CUDA builds
    return req


def main(pyproject_path: str) -> None:
    reqs = [r for line in requires("sglang") or [] if (r := _wanted(line, set()))]
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    own = project["dependencies"] + extras["dev"] + extras["bench"] + extras["router"]
    reqs += [r for line in own if (r := _wanted(line, {"dev", "bench", "router"})) and r.name != "sglang"]
    for req in reqs:
        print(req)


if __name__ == "__main__":
    main(sys.argv[1])
