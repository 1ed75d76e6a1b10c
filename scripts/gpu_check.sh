#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): on one CUDA GPU with torch + triton, no SGLang, no network.
# Without CUDA it reports that and exits 0. Arguments pass through (--out REPORT.json, --only NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$python" scripts/gpu_check.py "$@"
