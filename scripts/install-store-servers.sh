#!/usr/bin/env bash
# Install the Redis and PostgreSQL servers that tests/integration/test_session_stores.py
# starts on its own (random 127.0.0.1 ports, temp dirs). Idempotent: installs
# only what is missing, so a second run does nothing. The distro's services
# are kept from starting: the tests never use them, and in a container
# without an init system starting them only fails or wastes time.
set -euo pipefail

have_redis() { command -v redis-server >/dev/null; }
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }

pkgs=()
have_redis || pkgs+=(redis-server)
have_postgres || pkgs+=(postgresql)
if [ ${#pkgs[@]} -eq 0 ]; then
    echo "install-store-servers: redis-server and postgresql already installed"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# invoke-rc.d asks policy-rc.d before starting a service; 101 = "not allowed".
# Add one for the duration of the install unless the machine has its own.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}"

# With systemd the packages also enable their units for the next boot; undo
# that for what we just installed (the unit names match the package names).
if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now "${pkgs[@]}" >/dev/null 2>&1 || true
fi

if ! { have_redis && have_postgres; }; then
    echo "install-store-servers: servers still missing after install" >&2
    exit 1
fi
echo "install-store-servers: installed ${pkgs[*]}"
