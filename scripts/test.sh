#!/usr/bin/env bash
# Sets up a virtual environment with the test extras and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The chat page's browser test drives Debian's chromium (Playwright never downloads a browser).
# r1's int4 CPU kernel is compiled on first use with the system's C++ compiler.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v g++ >/dev/null || missing+=(g++)
if ((${#missing[@]})); then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch is pinned here (a CPU build); nothing else may pull another one.
.venv/bin/pip install -q torch==2.13.0 -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
