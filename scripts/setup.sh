#!/usr/bin/env bash
# Idempotent install of esamp-sgl and its dependencies into a project-local venv (.venv).
# CPU machines: torch + SGLang without its CUDA-only requirements (scripts/cpu_requirements.py)
# + a stand-in for the CPU ops of sgl_kernel. CUDA machines: the ordinary `[gpu,dev,bench,router]` install.
# A second run with unchanged inputs returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${ESAMP_VENV:-$root/.venv}
# SGLang 0.5.23 pins torch 2.14.1. Its PyPI build carries CUDA libraries but runs on CPU, and it
# is the only torch here beside which PyPI's torchvision imports (SGLang imports torchvision at
# import time, even for text models); the smaller CPU build 2.13.0 breaks torchvision.
torch_version=2.14.1
torchvision_version=0.29.1
stamp_inputs=(pyproject.toml scripts/setup.sh scripts/cpu_requirements.py)
stamp=$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)

if [ -f "$venv/.esamp-setup" ] && [ "$(cat "$venv/.esamp-setup")" = "$stamp" ]; then
    exit 0
fi
echo "esamp-sgl setup: installing into $venv (one-time, a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip packaging setuptools wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" -e "$root[gpu,dev,bench,router]"
else
    constraints=$(mktemp)
    requirements=$(mktemp)
    trap 'rm -f "$constraints" "$requirements"' EXIT
    printf 'torch==%s\ntorchvision==%s\n' "$torch_version" "$torchvision_version" >"$constraints"
    "${pip[@]}" "torch==$torch_version" "torchvision==$torchvision_version"
    "${pip[@]}" --no-deps "sglang==0.5.23"
    "$venv/bin/python" scripts/cpu_requirements.py pyproject.toml >"$requirements"
    "${pip[@]}" -c "$constraints" -r "$requirements"
    "${pip[@]}" --no-deps -e "$root"
    # sgl_kernel's CPU build is not on PyPI: expose our stand-in only where the real one is missing.
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -f "$site/esamp_sgl_kernel_cpu.pth"
    if ! "$venv/bin/python" -c 'import sgl_kernel' >/dev/null 2>&1; then
        echo "$root/runtime_patch/sgl_kernel_cpu" >"$site/esamp_sgl_kernel_cpu.pth"
    fi
fi
"$venv/bin/python" -c 'import sglang, esamp_sgl' # fail here, not later, if the install is broken
echo "$stamp" >"$venv/.esamp-setup"
