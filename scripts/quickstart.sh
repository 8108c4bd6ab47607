#!/bin/sh
# The main job on embedded defaults: install into ./.venv (or $VENV), then start
# the offline local model and the agent server and hold a two-turn conversation
# whose second turn recalls the first. Needs only python3 (>= 3.11): no root,
# no apt, no Docker, no API key.
#
# --serve: after the main job, keep a local model and an agent server running on
# 127.0.0.1 ($PORT, default 8000; sessions in $AGENT_DATA_DIR or .agent-data) for
# the chat page and curl, until Ctrl-C stops both.
set -eu
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
SERVE=false
if [ "${1:-}" = "--serve" ]; then
    SERVE=true
    shift
    # Before anything else: a server already on the port would answer our health checks, and the
    # banner would point at someone else's server. SO_REUSEADDR, as uvicorn binds: only a listener
    # makes the port taken, not a connection that has just closed.
    "$PYTHON" -c 'import socket, sys
port = sys.argv[1]
try:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(port)))
except (ValueError, OverflowError):
    sys.exit(f"quickstart: PORT must be a port number, got {port!r}")
except OSError as exc:
    sys.exit(f"quickstart: cannot listen on 127.0.0.1:{port} ({exc.strerror}): is another server there? "
             "Choose another port: PORT=8001 ./scripts/quickstart.sh --serve")' "${PORT:-8000}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    # Debian's python3 lacks ensurepip unless python3-venv is installed: fall
    # back to a pip-less venv and bootstrap pip from PyPI with the stdlib.
    "$PYTHON" -m venv "$VENV" 2>/dev/null || "$PYTHON" -m venv --without-pip --clear "$VENV"
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" scripts/bootstrap_pip.py
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
if [ "$SERVE" = false ]; then
    exec "$VENV/bin/python" -m hosting.demo "$@"
fi
"$VENV/bin/python" -m hosting.demo "$@"

# -- --serve ------------------------------------------------------------------
PY="$VENV/bin/python"
DATA_DIR="${AGENT_DATA_DIR:-.agent-data}"
LOGS="$DATA_DIR/logs"
SERVER_URL="http://127.0.0.1:${PORT:-8000}"
MODEL_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Each child gets its own session, so Ctrl-C reaches only this script, which then signals
# each child once (a second signal would make the server exit without stopping its CLIs).
DETACHED='import os, sys; os.setsid(); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])'
MODEL_PID=""
SERVER_PID=""

# shellcheck disable=SC2317  # called by the traps
stop() {
    trap - INT TERM HUP EXIT
    echo "Stopping the agent server (running turns may finish first) and the local model ..."
    for pid in $SERVER_PID $MODEL_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait
}
trap 'stop; exit 0' INT TERM HUP
trap stop EXIT

wait_healthy() {  # name url pid
    tries=0
    until "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$2" 2>/dev/null; do
        if ! kill -0 "$3" 2>/dev/null; then
            echo "quickstart: the $1 exited; see $LOGS (is ${PORT:-8000} taken? set PORT)" >&2
            exit 1
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 300 ]; then
            echo "quickstart: the $1 did not start within a minute; see $LOGS" >&2
            exit 1
        fi
        sleep 0.2
    done
}

mkdir -p "$LOGS"
echo
echo "Serving: the local model (not Claude) on 127.0.0.1:$MODEL_PORT, the agent server on $SERVER_URL ..."
"$PY" -c "$DETACHED" -m hosting.local_model --port "$MODEL_PORT" >>"$LOGS/local-model.log" 2>&1 &
MODEL_PID=$!
wait_healthy "local model" "http://127.0.0.1:$MODEL_PORT/local/requests" "$MODEL_PID"
ANTHROPIC_BASE_URL="http://127.0.0.1:$MODEL_PORT" ANTHROPIC_API_KEY="${ANTHROPIC_API_KEY:-local-model-needs-no-key}" \
    AGENT_DATA_DIR="$DATA_DIR" HOST=127.0.0.1 PORT="${PORT:-8000}" \
    "$PY" -c "$DETACHED" -m hosting.server >>"$LOGS/agent-server.log" 2>&1 &
SERVER_PID=$!
wait_healthy "agent server" "$SERVER_URL/health" "$SERVER_PID"

cat <<EOF

Chat page: $SERVER_URL/
Or with curl:
  curl -N -X POST $SERVER_URL/sessions/demo/messages -H 'content-type: application/json' -d '{"prompt": "Hello"}'
Ctrl-C stops both.
EOF
status=0
wait "$SERVER_PID" || status=$?
echo "quickstart: the agent server stopped by itself (exit $status); see $LOGS/agent-server.log" >&2
exit 1
