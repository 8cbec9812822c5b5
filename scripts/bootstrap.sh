#!/usr/bin/env bash
# Create .venv and install meterflow with pinned dependencies. Idempotent: a stamp of the
# requirement files skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.meterflow-installed"

command -v java >/dev/null || { echo "bootstrap: Java 17+ is required by Spark (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "bootstrap: Python 3.11+ is required" >&2; exit 1; }

wanted="$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
echo "bootstrap: installing pinned dependencies into $VENV (about 2 minutes the first time)" >&2
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements-dev.txt -c constraints.txt
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
echo "$wanted" > "$STAMP"
