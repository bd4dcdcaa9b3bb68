#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
# Makes a virtualenv, installs streamstars with its test and report extras (and Debian's chromium
# when apt can), runs ruff, mypy and pytest.
# pytest's exit code 5 ("no tests collected") fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STREAMSTARS_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test,report]"
# the report's browser test drives Debian's chromium (tests/report/test_report.py, test_page_in_headless_chromium; skipped with a
# message when it is absent): install it where apt can
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the report's browser test" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        chromium >/dev/null; } || echo "could not install chromium: the browser test is skipped" >&2
fi
"$VENV/bin/ruff" check streamstars state consumers tests scripts
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest -q "$@"
