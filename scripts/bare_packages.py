"""The project's packages as bare namespaces, for a machine with torch but no SGLang (the GPU
machine): esamp_sgl's own ``__init__`` enables SGLang's frontend, which such a machine cannot
import, while the engine-agnostic core and the scheduler state need nothing of SGLang."""

from __future__ import annotations

import sys
import types
from pathlib import Path

PACKAGES = ("esamp_sgl", "runtime_patch", "tests")


def register(root: Path) -> None:
    """Make ``import esamp_sgl.x`` (and runtime_patch.x, tests.x) load ``root``'s modules
    without running the packages' ``__init__``."""
    for name in PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(root) / name)]
        sys.modules[name] = package
