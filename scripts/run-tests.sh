#!/usr/bin/env bash
# Set up a fresh test environment (.venv, CPU torch) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
exec .venv/bin/python -m pytest -q tests "$@"
