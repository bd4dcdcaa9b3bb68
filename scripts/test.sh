#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
# Makes a virtualenv, installs streamstars with its test extra, runs ruff, mypy and pytest.
# pytest's exit code 5 ("no tests collected") fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STREAMSTARS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/ruff" check streamstars state consumers tests scripts
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -q "$@"
