#!/usr/bin/env bash
# start-dockerd.sh — make a Docker engine available on this machine (idempotent).
#
# Usage (as root):
#     scripts/start-dockerd.sh
#
# * If `docker info` already works: prints the engine version and exits 0.
# * Otherwise installs Debian's engine with apt-get if missing (docker.io with
#   its containerd/runc/tini, iptables, and docker-compose — Debian bookworm's
#   Compose is v1.29.2, the Python one: use `docker-compose`, not
#   `docker compose`; bookworm packages no Compose v2 plugin and no buildx),
#   then starts /usr/sbin/dockerd in the background and waits until
#   `docker info` answers.  The daemon outlives this script.
#
# Any `docker` client on PATH can be used: e.g. a newer /usr/local/bin/docker
# (28.x) negotiates the API down to the daemon's 1.41 (Debian's engine is
# 20.10).  `docker build` then uses the classic builder; do not set
# DOCKER_BUILDKIT=1 with a 23+ client (that needs the buildx plugin, which
# Debian does not ship), or use /usr/bin/docker (20.10) for BuildKit.
#
# Tried in order until one answers (first one works in our Firecracker
# sandbox: kernel with overlayfs, cgroup v1, iptables-nft):
#     overlay2 + iptables, vfs + iptables, overlay2 --iptables=false,
#     vfs --iptables=false
# Without iptables, containers on the default bridge have no outbound NAT and
# -p publishing is limited; `--network host` works in every mode.
# The bridge MTU is set to the default route's MTU when that is below 1500.
#
# Environment (optional):
#     DOCKERD_STORAGE_DRIVER   force one storage driver (e.g. vfs)
#     DOCKERD_IPTABLES         force true|false
#     DOCKERD_LOG              log file      (default /var/log/dockerd.log)
#     DOCKERD_PIDFILE          pid file      (default /var/run/docker.pid)
#     DOCKERD_START_TIMEOUT    seconds to wait per attempt (default 60)
#     DOCKERD_EXTRA_ARGS       extra dockerd arguments (word-split)
#
# Stop it again:  kill "$(cat /var/run/docker.pid)"
set -euo pipefail

log() { printf '[start-dockerd] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

DOCKERD=/usr/sbin/dockerd          # the daemon from Debian's docker.io
LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
PIDFILE="${DOCKERD_PIDFILE:-/var/run/docker.pid}"
TIMEOUT="${DOCKERD_START_TIMEOUT:-60}"

docker_ok() { docker info >/dev/null 2>&1; }
summary() {
    docker version --format 'docker: client {{.Client.Version}}, engine {{.Server.Version}} (API {{.Server.APIVersion}})' >&2 2>/dev/null || true
    docker info --format 'storage driver: {{.Driver}}, cgroup {{.CgroupVersion}} ({{.CgroupDriver}}), data root: {{.DockerRootDir}}' >&2 2>/dev/null || true
    if command -v docker-compose >/dev/null 2>&1; then
        log "compose: $(docker-compose version --short 2>/dev/null || echo '?') via 'docker-compose'"
    fi
}

if docker_ok; then
    log "docker engine already answering"
    summary
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "docker info fails and starting dockerd needs root"

# --- install ---------------------------------------------------------------
need=()
[ -x "$DOCKERD" ] || need+=(docker.io)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ! grep -q cgroup /proc/mounts; then need+=(cgroupfs-mount); fi
if [ "${#need[@]}" -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    aptlog="$(mktemp /tmp/start-dockerd-apt.XXXXXX)"
    apt-get update >"$aptlog" 2>&1 || { tail -n 20 "$aptlog" >&2; die "apt-get update failed"; }
    # --no-install-recommends: skips apparmor, git, needrestart, xz-utils ...
    apt-get install -y --no-install-recommends "${need[@]}" >>"$aptlog" 2>&1 \
        || { tail -n 20 "$aptlog" >&2; die "apt-get install ${need[*]} failed"; }
    rm -f "$aptlog"
    # A system with a service manager may have started the engine itself.
    if docker_ok; then log "engine started by the package"; summary; exit 0; fi
fi
[ -x "$DOCKERD" ] || die "$DOCKERD missing after install"
if ! grep -q cgroup /proc/mounts && command -v cgroupfs-mount >/dev/null 2>&1; then
    cgroupfs-mount || log "warning: cgroupfs-mount failed"
fi

# --- an engine already starting or a stale pid file ----------------------------
if [ -s "$PIDFILE" ]; then
    oldpid="$(cat "$PIDFILE")"
    if kill -0 "$oldpid" 2>/dev/null && [ "$(cat "/proc/$oldpid/comm" 2>/dev/null)" = dockerd ]; then
        log "dockerd (pid $oldpid) already running; waiting for it to answer"
        for _ in $(seq 1 "$TIMEOUT"); do
            if docker_ok; then summary; exit 0; fi
            sleep 1
        done
        die "dockerd pid $oldpid runs but docker info does not answer after ${TIMEOUT}s; see $LOG"
    fi
    log "removing stale pid file $PIDFILE (pid $oldpid)"
    rm -f "$PIDFILE"
fi

# --- options -------------------------------------------------------------------
common=(--pidfile "$PIDFILE")
daemon_json=/etc/docker/daemon.json
in_json() { [ -s "$daemon_json" ] && grep -q "\"$1\"" "$daemon_json"; }
# Container MTU = the uplink's MTU (eth0 here is 1400; docker0 defaults to 1500).
dev="$(ip route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i+1); exit }}')"
mtu="$(cat "/sys/class/net/${dev:-none}/mtu" 2>/dev/null || true)"
if [ -n "$mtu" ] && [ "$mtu" -lt 1500 ] && ! in_json mtu; then common+=(--mtu "$mtu"); fi
# shellcheck disable=SC2206
[ -n "${DOCKERD_EXTRA_ARGS:-}" ] && common+=(${DOCKERD_EXTRA_ARGS})

if [ -n "${DOCKERD_STORAGE_DRIVER:-}" ]; then drivers=("$DOCKERD_STORAGE_DRIVER")
elif in_json storage-driver; then drivers=("")       # daemon.json decides
else drivers=(overlay2 vfs); fi
if [ -n "${DOCKERD_IPTABLES:-}" ]; then iptables_modes=("$DOCKERD_IPTABLES")
elif in_json iptables; then iptables_modes=("")
else iptables_modes=(true false); fi

mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"

# --- start: first combination that answers wins ------------------------------------
ATTEMPT_START_LINE=0
log_tail() {
    # This attempt's log lines, without dockerd's info/debug chatter.
    tail -n +"$((ATTEMPT_START_LINE + 1))" "$LOG" | grep -vE 'level=(info|debug)' | tail -n "${1:-8}" | sed 's/^/    /'
}
try_start() {
    local args=("${common[@]}")
    [ -n "$1" ] && args+=(--storage-driver "$1")
    [ -n "$2" ] && args+=("--iptables=$2")
    printf '\n===== %s start-dockerd: %s %s\n' "$(date -u +%FT%TZ)" "$DOCKERD" "${args[*]}" >>"$LOG"
    ATTEMPT_START_LINE="$(wc -l <"$LOG")"
    log "starting $DOCKERD ${args[*]} (log: $LOG)"
    setsid "$DOCKERD" "${args[@]}" </dev/null >>"$LOG" 2>&1 &
    local pid=$! t=0
    while [ "$t" -lt "$TIMEOUT" ]; do
        if docker_ok; then
            log "dockerd pid $pid answers after ${t}s (storage ${1:-default}, iptables ${2:-default})"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { log "dockerd exited:"; log_tail >&2; return 1; }
        sleep 1; t=$((t + 1))
    done
    log "dockerd pid $pid did not answer within ${TIMEOUT}s; stopping it"
    kill "$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
    return 1
}

for ipt in "${iptables_modes[@]}"; do
    for drv in "${drivers[@]}"; do
        if try_start "$drv" "$ipt"; then
            [ "$ipt" = false ] && log "note: running with --iptables=false: bridge containers get no outbound NAT; use --network host"
            summary
            exit 0
        fi
    done
done

log "could not start dockerd with any of: storage ${drivers[*]:-default} x iptables ${iptables_modes[*]:-default}"
log "last warnings/errors of the last attempt (full log: $LOG):"
log_tail 30 >&2
exit 1
