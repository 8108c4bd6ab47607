#!/bin/sh
# The main job on embedded defaults: install into ./.venv (or $VENV), then start
# the offline local model and the agent server and hold a two-turn conversation
# whose second turn recalls the first. Needs only python3 (>= 3.11): no root,
# no apt, no Docker, no API key.
set -eu
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    # Debian's python3 lacks ensurepip unless python3-venv is installed: fall
    # back to a pip-less venv and bootstrap pip from PyPI with the stdlib.
    "$PYTHON" -m venv "$VENV" 2>/dev/null || "$PYTHON" -m venv --without-pip --clear "$VENV"
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" scripts/bootstrap_pip.py
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
exec "$VENV/bin/python" -m hosting.demo "$@"
