#!/bin/sh
# The whole test suite. As root it first installs the system services the tests
# drive for real (Redis, PostgreSQL, Docker); then it installs the package with
# its test extra into ./.venv (or $VENV), lints (ruff), type-checks (mypy, strict
# everywhere), checks the layers (lint-imports, pyproject.toml's [tool.importlinter])
# and runs pytest. Extra args go to pytest.
#
# --fast (first argument): the loop to run after every change. The same lint and
# type checks, then only the unit tier (tests/unit: pure logic, in process, the
# contract's refusals included); no system services are installed or started.
#
# The full suite runs on TEST_WORKERS pytest-xdist workers (default 2), a test
# module per worker (--dist loadfile: modules share expensive module fixtures);
# TEST_WORKERS=0 runs it in this one process.
set -eu
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
FAST=0
if [ "${1:-}" = --fast ]; then
    FAST=1
    shift
fi

if [ "$FAST" = 0 ] && [ "$(id -u)" = 0 ]; then
    for setup in scripts/install-store-servers.sh scripts/install-test-tools.sh scripts/start-dockerd.sh; do
        [ -x "$setup" ] && "$setup"
    done
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"

"$VENV/bin/python" -m ruff check --quiet .
"$VENV/bin/python" -m mypy
"$VENV/bin/lint-imports" --no-cache

status=0
if [ "$FAST" = 1 ]; then
    "$VENV/bin/python" -m pytest tests/unit "$@" || status=$?
else
    "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@" || status=$?
fi
if [ "$status" = 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
