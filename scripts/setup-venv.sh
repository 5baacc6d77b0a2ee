#!/usr/bin/env bash
# Create .venv from requirements-test.txt (CPU torch, the Cog SDK and HTTP server, the test tools), or
# bring it up to date. Does nothing when .venv was already installed from this requirements-test.txt.
# The one place the install steps live, for every script that needs the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
installed_from=.venv/.installed-from-requirements-test.txt
if [ -f "$installed_from" ] && cmp -s "$installed_from" requirements-test.txt; then
    exit 0
fi
echo "installing requirements-test.txt into .venv (the first time takes a few minutes)"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
cp requirements-test.txt "$installed_from"
