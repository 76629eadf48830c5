#!/usr/bin/env bash
# Creates the Python venv used to produce llama.cpp reference fixtures and benchmark figures
# (scripts/make_fixtures.py, scripts/llamacpp_bench.py). Nothing in `cargo test` needs it.
#
#   scripts/setup-reference.sh            # idempotent: skips packages already at the pinned version
#
# llama-cpp-python is built from source (10-20 min on 2 cores), so versions are pinned to keep
# the committed fixtures reproducible.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
GGUF_VERSION="0.17.1"

HOME_DIR="${CORTENSOR_HOME:-$HOME/.cache/cortensor}"
VENV="$HOME_DIR/venv-reference"
PYTHON_BIN="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv at $VENV"
    mkdir -p "$HOME_DIR"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

PY="$VENV/bin/python"

# Prints the installed version of a distribution, or nothing.
installed_version() {
    "$PY" - "$1" <<'PYEOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

need=()
[ "$(installed_version llama_cpp_python)" = "$LLAMA_CPP_PYTHON_VERSION" ] \
    || need+=("llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION")
[ "$(installed_version gguf)" = "$GGUF_VERSION" ] || need+=("gguf==$GGUF_VERSION")
[ -n "$(installed_version numpy)" ] || need+=("numpy")
[ -n "$(installed_version jinja2)" ] || need+=("jinja2")

if [ "${#need[@]}" -eq 0 ]; then
    echo "reference venv up to date: $VENV"
    exit 0
fi

echo "installing: ${need[*]}"
# Build from source with the machine's default CMake options; parallelism bounded so a concurrent
# Rust build is not starved.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$PY" -m pip install --no-cache-dir "${need[@]}"

echo "reference venv ready: $VENV"
"$PY" -c 'import llama_cpp, gguf, numpy, jinja2; print("llama-cpp-python", llama_cpp.__version__)'
