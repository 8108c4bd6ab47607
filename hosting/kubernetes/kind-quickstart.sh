#!/usr/bin/env bash
# Tier 3 on your laptop: a kind cluster running the gateway, Redis, the egress proxy and
# agent pods, with the NetworkPolicies enforced. Safe to run again: it keeps the cluster,
# the tokens and the passwords it made, rebuilds the images and rolls them out.
#
#   ANTHROPIC_API_KEY=sk-ant-... hosting/kubernetes/kind-quickstart.sh
#   hosting/kubernetes/teardown.sh          # removes everything this made
#
# Settings (environment): KIND_CLUSTER_NAME (research-agent), GATEWAY_LOCAL_PORT (8080),
# RESEARCH_AGENT_KIND_STATE (~/.local/state/research-agent-kind: tenant tokens, port-forward),
# BASE_IMAGE (a Debian bookworm base for both images; default: the Dockerfiles' own),
# KIND_OVERLAY (kind; kind-session-volumes: each session's /data a PersistentVolumeClaim).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CLUSTER=${KIND_CLUSTER_NAME:-research-agent}
NAMESPACE=research-agent
PORT=${GATEWAY_LOCAL_PORT:-8080}
OVERLAY=${KIND_OVERLAY:-kind}
STATE=${RESEARCH_AGENT_KIND_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/research-agent-kind}
TOKENS=$STATE/tenant-tokens
TENANTS=(alice bob)
# kindnet enforces NetworkPolicy from kind v0.24.0 on; v0.29.0 is past its early faults
# (unreliable DNS under policies, kubelet probes blocked): see README.md.
KIND_MINIMUM=0.29.0

say() { echo "kind-quickstart: $*"; }
die() {
    echo "kind-quickstart: $*" >&2
    exit 1
}

preflight() {
    local missing=0 tool
    for tool in docker kind kubectl; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "kind-quickstart: '$tool' is not on PATH; install it first (see hosting/kubernetes/README.md)" >&2
            missing=1
        fi
    done
    if [ -z "${ANTHROPIC_API_KEY:-}" ]; then
        echo "kind-quickstart: ANTHROPIC_API_KEY is not set; export it (it goes only into the egress proxy's Secret)" >&2
        missing=1
    fi
    [ "$missing" -eq 0 ] || exit 1
    case $OVERLAY in
        kind | kind-session-volumes) ;;
        *) die "KIND_OVERLAY must be kind or kind-session-volumes, not '$OVERLAY'" ;;
    esac
    case $ANTHROPIC_API_KEY in
        *[!A-Za-z0-9_-]*) die "ANTHROPIC_API_KEY holds characters an Anthropic key does not have (only A-Z a-z 0-9 _ -)" ;;
    esac
    local version
    version=$(kind version | sed -n 's/^kind v\([0-9][0-9.]*\).*/\1/p')
    if [ -z "$version" ] || [ "$(printf '%s\n%s\n' "$KIND_MINIMUM" "$version" | sort -V | head -n1)" != "$KIND_MINIMUM" ]; then
        die "kind ${version:-of unknown version} is too old: v$KIND_MINIMUM or later enforces NetworkPolicy reliably"
    fi
    docker info >/dev/null 2>&1 || die "docker is installed but its engine does not answer (is it running, may you use it?)"
}

k() { kubectl --context "kind-$CLUSTER" "$@"; }

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1
}

random_hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

# Secrets travel on stdin (printf is a builtin): no value is ever an argument or echoed.
apply_secret() {
    local name=$1 key=$2
    k -n "$NAMESPACE" create secret generic "$name" --from-file="$key"=/dev/stdin --dry-run=client -o yaml |
        k apply -f - >/dev/null
}

# Made once and kept: a new password or token would strand running pods and clients.
ensure_generated_secret() {
    local name=$1 key=$2
    if ! k -n "$NAMESPACE" get secret "$name" >/dev/null 2>&1; then
        printf '%s' "$(random_hex)" | apply_secret "$name" "$key"
    fi
}

ensure_cluster() {
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        say "cluster $CLUSTER exists"
    else
        kind create cluster --name "$CLUSTER" --config "$HERE/kind-cluster.yaml" --wait 180s
    fi
}

build_images() {
    local args=()
    [ -z "${BASE_IMAGE:-}" ] || args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    docker build "${args[@]}" -f "$REPO/hosting/Dockerfile" -t research-agent:latest "$REPO"
    docker build "${args[@]}" -t egress-proxy:latest "$HERE/egress-proxy"
    kind load docker-image --name "$CLUSTER" research-agent:latest egress-proxy:latest
}

make_secrets() {
    k apply -f "$HERE/base/namespace.yaml" >/dev/null
    printf '%s' "$ANTHROPIC_API_KEY" | apply_secret egress-proxy-key api-key
    ensure_generated_secret redis-auth password
    ensure_generated_secret gateway-admin token
    (
        umask 077
        mkdir -p "$STATE"
        local tenant
        for tenant in "${TENANTS[@]}"; do
            grep -q "^$tenant " "$TOKENS" 2>/dev/null || printf '%s %s\n' "$tenant" "$(random_hex)" >>"$TOKENS"
        done
    )
    chmod 600 "$TOKENS"
    tenants_file | apply_secret gateway-tenants tenants
}

# GATEWAY_TENANTS_FILE's format: "tenant sha256:<hex of token>"; the tokens stay here.
tenants_file() {
    local tenant token
    while read -r tenant token; do
        printf '%s sha256:%s\n' "$tenant" "$(printf '%s' "$token" | sha256)"
    done <"$TOKENS"
}

deploy() {
    local existed
    existed=$(k -n "$NAMESPACE" get deployment gateway -o name 2>/dev/null || true)
    k apply -k "$HERE/overlays/$OVERLAY"
    # Same tags, new images or Secrets: restart so that they are used.
    [ -z "$existed" ] || k -n "$NAMESPACE" rollout restart deployment/gateway deployment/egress-proxy
    local workload
    for workload in statefulset/redis deployment/egress-proxy deployment/gateway; do
        k -n "$NAMESPACE" rollout status "$workload" --timeout=300s
    done
}

# A pod that no policy allows anything must not reach the gateway. If it can, the CNI
# ignores NetworkPolicy and agent pods are not locked in: say so loudly.
check_network_policy() {
    local address overrides output
    address=$(k -n "$NAMESPACE" get service gateway -o jsonpath='{.spec.clusterIP}')
    overrides=$(
        cat <<EOF
{"spec": {"automountServiceAccountToken": false,
  "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
  "containers": [{"name": "netpol-check", "image": "research-agent:latest", "imagePullPolicy": "IfNotPresent",
    "command": ["python3", "-c", "import socket\ntry:\n socket.create_connection(('$address', 8080), 5)\n print('REACHED')\nexcept OSError:\n print('BLOCKED')"],
    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}}]}}
EOF
    )
    k -n "$NAMESPACE" delete pod netpol-check --ignore-not-found >/dev/null
    output=$(k -n "$NAMESPACE" run netpol-check --rm -i --quiet --restart=Never --image=research-agent:latest \
        --overrides="$overrides" 2>&1 || true)
    case $output in
        *BLOCKED*) say "NetworkPolicy is enforced (a pod with no allowance could not reach the gateway)" ;;
        *REACHED*) echo "kind-quickstart: WARNING: NetworkPolicy is NOT enforced by this cluster's CNI: agent pods are not" \
            "locked in. See 'NetworkPolicy' in hosting/kubernetes/README.md." >&2 ;;
        *) echo "kind-quickstart: WARNING: could not check NetworkPolicy enforcement: $output" >&2 ;;
    esac
}

port_forward() {
    local pid_file=$STATE/port-forward.pid
    if [ -f "$pid_file" ]; then
        local old
        old=$(cat "$pid_file")
        if ps -p "$old" -o args= 2>/dev/null | grep -q "port-forward"; then kill "$old"; fi
        rm -f "$pid_file"
    fi
    nohup kubectl --context "kind-$CLUSTER" -n "$NAMESPACE" port-forward --address 127.0.0.1 service/gateway \
        "$PORT:8080" >"$STATE/port-forward.log" 2>&1 &
    echo $! >"$pid_file"
    local tries=0
    until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
        tries=$((tries + 1))
        [ "$tries" -lt 50 ] || die "the port-forward to the gateway did not open; see $STATE/port-forward.log"
        sleep 0.2
    done
}

main() {
    preflight
    ensure_cluster
    build_images
    make_secrets
    deploy
    check_network_policy
    port_forward
    cat <<EOF

The gateway answers on http://127.0.0.1:$PORT (kubectl port-forward, pid $(cat "$STATE/port-forward.pid")).
Demo tenants: ${TENANTS[*]}. Their tokens are in $TOKENS (mode 0600), one "tenant token" a line:

    TOKEN=\$(awk '\$1 == "alice" {print \$2}' $TOKENS)
    curl -N -X POST 127.0.0.1:$PORT/sessions/demo/messages -H "Authorization: Bearer \$TOKEN" \\
         -H 'content-type: application/json' -d '{"prompt": "What is the tallest tree species?"}'

Remove everything with: $HERE/teardown.sh
EOF
}

# Sourced (the tests call its functions): define only.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
