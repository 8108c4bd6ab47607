#!/usr/bin/env bash
# build-base-image.sh — build a local Debian bookworm + Python 3.11 base image
# without any container registry (debootstrap -> `docker import`).
#
# Use it where `docker pull python:3.11-slim-bookworm` cannot work (no registry
# reachable), and point the Dockerfile's FROM at the result, e.g.
#     docker build --build-arg BASE_IMAGE=research-agent-base:bookworm ...
# with `ARG BASE_IMAGE=python:3.11-slim-bookworm` / `FROM ${BASE_IMAGE}`.
#
# Usage:
#     hosting/docker/build-base-image.sh [--force] [--no-upgrade] [TAG]
#
#     TAG       image tag to create (default: $BASE_IMAGE_TAG, else
#               research-agent-base:bookworm)
#     --force   rebuild even if TAG already exists (default: skip, exit 0)
#     --no-upgrade  skip `apt-get upgrade` from bookworm-updates/-security
#               (default: upgrade, so the image has current security fixes)
#
# Environment (all optional):
#     BASE_IMAGE_TAG   default tag, see above
#     DEBIAN_MIRROR    Debian mirror (default: the first .../debian URI in the
#                      host's /etc/apt/sources.list{,.d/*}, else
#                      http://deb.debian.org/debian)
#     DEBIAN_SECURITY_MIRROR   same for .../debian-security (only written into
#                      the image's apt sources; debootstrap does not use it)
#     HOST_CA_BUNDLE   CA bundle copied into the image
#                      (default: /etc/ssl/certs/ca-certificates.crt)
#     WORK_PARENT      where the temporary rootfs is made (default: /var/tmp)
#
# What the image contains / how it stands in for python:3.11-slim-bookworm:
#   * Debian bookworm minbase + python3 (3.11), python3-venv, python3-pip,
#     python-is-python3, ca-certificates.  Debian's python lives in /usr/bin;
#     /usr/local/bin/{python,python3,python3.11,pip,pip3} are symlinks to it
#     so Dockerfiles that hard-code python:3.11-slim's paths still work.
#   * PEP 668's EXTERNALLY-MANAGED marker is removed, so `pip install` outside
#     a venv behaves as in python:3.11-slim.
#   * Every CA certificate the host trusts beyond stock Debian (here: the
#     TLS-intercepting egress proxy's CA, found by comparing the host's
#     /etc/ssl/certs/ca-certificates.crt with the stock CAs) is installed in
#     /usr/local/share/ca-certificates and merged into the image's
#     /etc/ssl/certs/ca-certificates.crt; it survives a later
#     update-ca-certificates run inside a build.
#   * /etc/pip.conf sets `cert = /etc/ssl/certs/ca-certificates.crt`, and
#     SSL_CERT_FILE / REQUESTS_CA_BUNDLE / NODE_EXTRA_CA_CERTS point at the same
#     bundle, so pip (and httpx/requests/node) work through the proxy.
#   * apt sources point at the same mirror as the host (bookworm,
#     bookworm-updates, bookworm-security), so `apt-get update && apt-get
#     install ...` works in Dockerfiles.  Lists and caches are cleaned;
#     docs/man pages/locales are removed and excluded from later installs.
#   * ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin,
#     LANG=C.UTF-8, CMD ["python3"] (as python:3.11-slim).
#
# Needs root (debootstrap, chroot) and a reachable Docker daemon; if `docker
# info` fails and scripts/start-dockerd.sh exists, that is run first.
# debootstrap is installed with apt-get if missing.
set -euo pipefail

log() { printf '[build-base-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

FORCE=0
UPGRADE=1
TAG="${BASE_IMAGE_TAG:-research-agent-base:bookworm}"
while [ $# -gt 0 ]; do
    case "$1" in
        --force|-f) FORCE=1 ;;
        --no-upgrade) UPGRADE=0 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) TAG="$1" ;;
    esac
    shift
done

SUITE=bookworm
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
WORK_PARENT="${WORK_PARENT:-/var/tmp}"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap/chroot)"

# --- docker daemon --------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    if [ -x "$REPO_ROOT/scripts/start-dockerd.sh" ]; then
        log "docker daemon not reachable; running scripts/start-dockerd.sh"
        "$REPO_ROOT/scripts/start-dockerd.sh"
    fi
    docker info >/dev/null 2>&1 || die "docker daemon not reachable (docker info fails)"
fi

if [ "$FORCE" -eq 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "image $TAG already exists; nothing to do (use --force to rebuild)"
    exit 0
fi

# --- mirrors: reuse what the host's apt uses ------------------------------
apt_uris() {
    # Every http(s)/file URI on a non-comment line of the apt sources, in
    # order (covers both one-line .list and deb822 .sources files).
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -v '^[[:space:]]*#' "$f" | grep -oE '(https?|file):/[^][:space:]]+' || true
    done
}
if [ -z "${DEBIAN_MIRROR:-}" ]; then
    DEBIAN_MIRROR="$(apt_uris | grep -E '/debian/?$' | head -n1 || true)"
    DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
fi
if [ -z "${DEBIAN_SECURITY_MIRROR:-}" ]; then
    DEBIAN_SECURITY_MIRROR="$(apt_uris | grep -E '/debian-security/?$' | head -n1 || true)"
    DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
fi
DEBIAN_MIRROR="${DEBIAN_MIRROR%/}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR%/}"
log "tag=$TAG suite=$SUITE mirror=$DEBIAN_MIRROR security=$DEBIAN_SECURITY_MIRROR"

[ -s "$HOST_CA_BUNDLE" ] || die "CA bundle $HOST_CA_BUNDLE missing or empty"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        debootstrap >/dev/null
fi

# --- temp rootfs + cleanup --------------------------------------------------
mkdir -p "$WORK_PARENT"
WORK="$(mktemp -d "$WORK_PARENT/research-agent-base.XXXXXX")"
ROOTFS="$WORK/rootfs"

umount_under() {
    # Unmount anything (proc, sys, dev/pts ... left by a failed debootstrap)
    # below $1, deepest first.
    local m
    awk -v p="$1" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts \
        | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
cleanup() {
    local rc=$?
    if [ -d "$WORK" ]; then
        umount_under "$ROOTFS"
        rm -rf --one-file-system "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- debootstrap ------------------------------------------------------------
PKGS=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
log "debootstrap --variant=minbase $SUITE (+ $PKGS) into $ROOTFS"
t0=$(date +%s)
if ! debootstrap --variant=minbase --components=main --include="$PKGS" \
        "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 40 "$WORK/debootstrap.log" >&2
    [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 40 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
log "debootstrap done in $(( $(date +%s) - t0 ))s"
umount_under "$ROOTFS"

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# --- configure ---------------------------------------------------------------
# apt sources: same mirror as the host, plus updates and security.
rm -f "$ROOTFS/etc/apt/sources.list"
cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# Container-friendly apt/dpkg config (as Debian's official images do).
cat >"$ROOTFS/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
# Do not start services during package installs inside containers.
exit 101
EOF
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-excludes" <<'EOF'
# Keep images small: no docs, man pages or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
# (Recommends stay on, as in debian:bookworm-slim / python:3.11-slim.)
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF

# Pull in bookworm-updates / bookworm-security (debootstrap only used the
# release suite), as the official images are rebuilt with them.
if [ "$UPGRADE" -eq 1 ]; then
    log "apt-get upgrade from $SUITE-updates / $SUITE-security"
    mount -t proc proc "$ROOTFS/proc"
    if ! in_root sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold upgrade' \
            >"$WORK/upgrade.log" 2>&1; then
        tail -n 30 "$WORK/upgrade.log" >&2
        die "apt-get upgrade in the rootfs failed"
    fi
    grep -E '^[0-9]+ upgraded' "$WORK/upgrade.log" >&2 || true
    umount_under "$ROOTFS"
fi

# CA certificates.  The host's bundle is its stock Debian CAs plus local
# additions (here: the TLS-intercepting egress proxy's CA).  The additions --
# certificates in the host bundle that are neither in the image's stock bundle
# nor in the host's /usr/share/ca-certificates -- become local CAs of the image
# (/usr/local/share/ca-certificates, so they survive an update-ca-certificates
# run in a later build) and the image's bundle is regenerated.  With the same
# ca-certificates version as the host this gives the host bundle's content; when
# the image's is newer (after the upgrade) Debian's newer Mozilla set is kept,
# i.e. CAs Debian has since dropped are not brought back from the host.
extract_extras() {
    # extract_extras STOCK_PEM BUNDLE [OUTDIR]: print how many certificates of
    # BUNDLE are not in STOCK_PEM; write each one to OUTDIR/host-extra-NN.crt.
    # Certificates are compared as PEM text with all whitespace removed.
    awk -v stock="$1" -v outdir="${3:-}" '
    BEGIN {
        inpem = 0
        while ((getline line < stock) > 0) {
            k = line; gsub(/[ \t\r]/, "", k)
            if (k == "-----BEGINCERTIFICATE-----") { inpem = 1; cur = "" }
            if (inpem) cur = cur k
            if (k == "-----ENDCERTIFICATE-----") { inpem = 0; seen[cur] = 1 }
        }
        n = 0; inpem = 0
    }
    {
        k = $0; gsub(/[ \t\r]/, "", k)
        if (k == "-----BEGINCERTIFICATE-----") { inpem = 1; key = ""; pem = "" }
        if (inpem) { raw = $0; sub(/\r$/, "", raw); pem = pem raw "\n"; key = key k }
        if (k == "-----ENDCERTIFICATE-----" && inpem) {
            inpem = 0
            if (!(key in seen)) {
                seen[key] = 1; n++
                if (outdir != "") {
                    f = sprintf("%s/host-extra-%02d.crt", outdir, n)
                    printf "%s", pem > f; close(f)
                }
            }
        }
    }
    END { print n }
    ' "$2"
}
host_stock_pems() {
    local f
    find /usr/share/ca-certificates -type f -name '*.crt' 2>/dev/null | sort \
        | while read -r f; do cat "$f"; echo; done
    return 0
}
{ cat "$ROOTFS/etc/ssl/certs/ca-certificates.crt"; host_stock_pems; } >"$WORK/stock.pem"
mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
n_extra="$(extract_extras "$WORK/stock.pem" "$HOST_CA_BUNDLE" "$ROOTFS/usr/local/share/ca-certificates")"
log "host CA certificates added to the image: $n_extra (host bundle: $HOST_CA_BUNDLE)"
in_root update-ca-certificates --fresh >"$WORK/update-ca.log" 2>&1 \
    || { tail -n 20 "$WORK/update-ca.log" >&2; die "update-ca-certificates failed in rootfs"; }
{ cat "$ROOTFS/etc/ssl/certs/ca-certificates.crt"; host_stock_pems; } >"$WORK/stock.pem"
n_missing="$(extract_extras "$WORK/stock.pem" "$HOST_CA_BUNDLE")"
[ "$n_missing" -eq 0 ] || die "$n_missing host CA certificate(s) missing from the image bundle"
log "image CA bundle: $(grep -c 'BEGIN CERTIFICATE' "$ROOTFS/etc/ssl/certs/ca-certificates.crt") certificates"

cat >"$ROOTFS/etc/pip.conf" <<'EOF'
[global]
cert = /etc/ssl/certs/ca-certificates.crt
disable-pip-version-check = true
EOF

# Drop-in for python:3.11-slim: pip outside a venv allowed, and its paths.
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
for n in python python3 python3.11; do ln -sf "/usr/bin/python3.11" "$ROOTFS/usr/local/bin/$n"; done
for n in pip pip3; do ln -sf "/usr/bin/$n" "$ROOTFS/usr/local/bin/$n"; done
ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip3.11"

PYVER="$(in_root python3 -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"
log "python in image: $PYVER"
case "$PYVER" in 3.11.*) ;; *) die "expected Python 3.11, got $PYVER" ;; esac

# --- slim down ----------------------------------------------------------------
in_root apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/debconf/*-old \
       "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/var/cache/ldconfig/aux-cache \
       "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/groff/* "$ROOTFS"/usr/share/lintian/* \
       "$ROOTFS"/usr/share/linda/* "$ROOTFS"/debootstrap \
       "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* "$ROOTFS"/root/.cache
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
     -exec rm -rf {} + 2>/dev/null || true
find "$ROOTFS/var/log" -type f -delete 2>/dev/null || true
# Files docker manages itself / host specific.
: >"$ROOTFS/etc/resolv.conf"
: >"$ROOTFS/etc/hostname"
rm -f "$ROOTFS/etc/machine-id" "$ROOTFS/var/lib/dbus/machine-id"
: >"$ROOTFS/etc/machine-id"
log "rootfs size: $(du -sh "$ROOTFS" | cut -f1)"

# --- import -----------------------------------------------------------------------
old_id="$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
log "docker import -> $TAG"
t0=$(date +%s)
tar --numeric-owner --xattrs -C "$ROOTFS" -cf - . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
    --change "ENV PYTHON_VERSION=$PYVER" \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 ($DEBIAN_MIRROR)" \
    - "$TAG" >/dev/null
log "import done in $(( $(date +%s) - t0 ))s"
# --force: drop the image it replaced, unless something still uses it.
if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect --format '{{.Id}}' "$TAG")" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || log "previous $TAG ($old_id) still in use; kept"
fi
docker image ls "$TAG" >&2
