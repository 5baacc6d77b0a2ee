#!/usr/bin/env bash
# Serve the predictor on this machine, no GPU, Docker or Cog CLI needed: sets up .venv, builds a tiny
# random checkpoint once (or uses --weights DIR), writes the input schema and runs the real Cog HTTP
# server on 127.0.0.1 in the foreground (Ctrl-C stops it); once it is ready, prints a curl line that reads
# samples/page.png.
#
#   bash scripts/serve-local.sh [--port 5000] [--weights DIR] [--concurrency N] [--python PYTHON]
#
# --python PYTHON runs with an interpreter whose environment already has requirements-test.txt
# installed, and skips setting up .venv (the tests use it from inside .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python)
            [ $# -ge 2 ] || { echo "serve-local.sh: --python needs a path to a Python interpreter" >&2; exit 2; }
            python="$2"
            shift 2
            ;;
        --python=*)
            python="${1#--python=}"
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

if [ -z "$python" ]; then
    bash scripts/setup-venv.sh
    python=.venv/bin/python
fi
exec "$python" scripts/serve_local.py "${args[@]+"${args[@]}"}"
