#!/bin/sh
# Container entrypoint.
#   entrypoint.sh serve [uvicorn-free args ignored]  start the HTTP/SSE server on $HOST:$PORT
#                                                    (off loopback: needs AGENT_AUTH_TOKEN, or
#                                                    AGENT_ALLOW_UNAUTHENTICATED=1 on purpose)
#   entrypoint.sh                                    run the agent once on $PROMPT, answer on stdout
#   entrypoint.sh runner run|status|stop             a self-hosted environment's runner (hosting/environments)
#   entrypoint.sh CMD ...                            run CMD (debugging: sh, python, ...)
set -eu
PYTHON="${PYTHON:-python3}"
case "${1:-}" in
    serve) exec "$PYTHON" -m hosting.server ;;
    runner) shift; exec "$PYTHON" -m hosting.environments.runner "$@" ;;
    "") exec "$PYTHON" -m hosting.run_once ;;
    *) exec "$@" ;;
esac
