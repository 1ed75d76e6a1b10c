"""The wheel: built from this checkout, installed into a fresh virtual environment, it gives a
working ``esamp-sgl`` and installs no generic top-level names (``programs``, ``benchmarks``).

The fresh venv borrows this venv's third-party packages through a ``.pth`` line naming our
site-packages: a directory listed in a ``.pth`` joins ``sys.path`` but its own ``.pth`` files are
not processed, so the repo's editable install (a ``.pth`` + finder there) stays out; the test
checks that ``esamp_sgl`` resolves inside the fresh venv.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repo folder -> where its modules land in the wheel (pyproject.toml's [tool.setuptools]).
SHIPPED = {"esamp_sgl": "esamp_sgl", "runtime_patch": "runtime_patch",
           "programs": "esamp_sgl/programs", "benchmarks": "esamp_sgl/benchmarks"}
# Commands past the top-level help, with their exit codes: each imports the code it runs from the
# installed package, then stops short of a server (an unknown model is exit code 2).
COMMANDS = {
    "serve": (["serve", "--model", "/nonexistent"], 2),
    "run": (["run", "self-consistency", "--help"], 0),
    "bench": (["bench", "quality", "--help"], 0),
    "demo": (["demo", "--model", "/nonexistent"], 2),
    "models": (["models", "list"], 0),
}
# Each `esamp-sgl` process spends ~10 s of CPU importing SGLang, so one process in the fresh venv runs
# them all through the console script's function, esamp_sgl.cli.main, after checking what imports.
DRIVER = """
import contextlib, importlib.util, io, json, sys


def absent(name):
    try:
        __import__(name)
    except ModuleNotFoundError:
        return True
    return False


def call(argv):
    from esamp_sgl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's --help
            code = e.code
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


print(json.dumps({"origin": importlib.util.find_spec("esamp_sgl").origin,
                  "absent": [name for name in ("programs", "benchmarks") if absent(name)],
                  "commands": {name: call(argv) for name, argv in json.loads(sys.argv[1]).items()}}))
"""


def _build_wheel(tmp: Path) -> Path:
    """Builds from a copy: pip builds in the source tree, and build/ there is not git-ignored."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for name in SHIPPED:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-index", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], check=True)
    (wheel,) = (tmp / "dist").glob("esamp_sgl-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv of the base interpreter with our dependencies (not our editable install) and the wheel."""
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "esamp_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # This venv's pip installs into the fresh one (--python): no ensurepip, nothing downloaded.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--disable-pip-version-check", "--no-deps", "--no-index", str(wheel)], check=True)
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a virtual environment: no third-party packages to lend a fresh one")
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(tmp)
    return wheel, _fresh_venv(tmp, wheel)


def _outside_repo(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Without PYTHONPATH; COLUMNS keeps argparse from wrapping the help lines the test reads."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "COLUMNS": "200"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_only_esamp_sgl_and_runtime_patch(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = configparser.ConfigParser()
        entry_points.read_string(whl.read(f"{dist_info}/entry_points.txt").decode())
    assert {n.split("/")[0] for n in names} == {"esamp_sgl", "runtime_patch", dist_info}
    assert entry_points["sglang.srt.plugins"]["esamp"] == "runtime_patch.plugin:register"
    assert entry_points["console_scripts"]["esamp-sgl"] == "esamp_sgl.cli:main"
    # The package list in pyproject.toml is by hand: every module of the shipped folders is in it.
    expected = {f"{SHIPPED[folder]}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder in SHIPPED for path in (ROOT / folder).rglob("*.py") if "__pycache__" not in path.parts}
    assert expected == {n for n in names if n.endswith(".py")}


def test_the_console_script_runs_outside_the_repo(installed, tmp_path):
    _, venv = installed
    done = _outside_repo([str(venv / "bin" / "esamp-sgl"), "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "self-consistency, best-of-n, tree-of-thought, creative-fanout" in done.stdout


def test_every_command_finds_its_code_in_the_wheel(installed, tmp_path):
    _, venv = installed
    argvs = {name: argv for name, (argv, _) in COMMANDS.items()}
    done = _outside_repo([str(venv / "bin" / "python"), "-c", DRIVER, json.dumps(argvs)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert Path(report["origin"]).resolve().is_relative_to(venv.resolve()), report["origin"]
    assert report["absent"] == ["programs", "benchmarks"]
    commands = report["commands"]
    codes = {name: c["code"] for name, c in commands.items()}
    stderr = {name: c["stderr"][-2000:] for name, c in commands.items()}
    assert codes == {name: code for name, (_, code) in COMMANDS.items()}, stderr
    assert "neither a known model" in commands["serve"]["stderr"]
    assert "usage: esamp-sgl run self-consistency" in commands["run"]["stdout"]
    assert "usage: esamp-sgl bench quality" in commands["bench"]["stdout"]
    assert "--results-dir" in commands["bench"]["stdout"]
    assert "starting an ESamp server" in commands["demo"]["stdout"]
    assert "neither a known model" in commands["demo"]["stderr"]
    assert "smollm2-135m" in commands["models"]["stdout"]
