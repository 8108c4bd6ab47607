#!/usr/bin/env bash
# Remove what kind-quickstart.sh made: the port-forward, the kind cluster (and with it
# every pod, Secret and volume in it), the tenant tokens and the state folder.
# Safe to run again, and after a quickstart that stopped half way.
set -euo pipefail

CLUSTER=${KIND_CLUSTER_NAME:-research-agent}
STATE=${RESEARCH_AGENT_KIND_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/research-agent-kind}

if ! command -v kind >/dev/null 2>&1; then
    echo "teardown: 'kind' is not on PATH; install it to delete the cluster $CLUSTER" >&2
    exit 1
fi

if [ -f "$STATE/port-forward.pid" ]; then
    pid=$(cat "$STATE/port-forward.pid")
    if ps -p "$pid" -o args= 2>/dev/null | grep -q "port-forward"; then kill "$pid"; fi
fi

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER"
else
    echo "teardown: no kind cluster named $CLUSTER"
fi

rm -f "$STATE/tenant-tokens" "$STATE/port-forward.pid" "$STATE/port-forward.log"
rmdir "$STATE" 2>/dev/null || true
echo "teardown: done"
