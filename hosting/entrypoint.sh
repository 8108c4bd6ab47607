#!/bin/sh
# Container entrypoint.
#   entrypoint.sh serve [uvicorn-free args ignored]  start the HTTP/SSE server on $HOST:$PORT
#   entrypoint.sh                                    run the agent once on $PROMPT, answer on stdout
#   entrypoint.sh CMD ...                            run CMD (debugging: sh, python, ...)
set -eu
PYTHON="${PYTHON:-python3}"
case "${1:-}" in
    serve) exec "$PYTHON" -m hosting.server ;;
    "") exec "$PYTHON" -m hosting.run_once ;;
    *) exec "$@" ;;
esac
