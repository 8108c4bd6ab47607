#!/usr/bin/env bash
# Install the Debian tools the tests drive for real beyond the stores and Docker
# (one line per tool below, with the test that needs it). Idempotent: installs only
# what is missing. Run as root (scripts/test.sh does when it is root).
set -euo pipefail

# command-on-PATH  debian-package   (who needs it)
TOOLS=(
    "nginx nginx"               # egress proxy tests (tests/system/test_egress_proxy.py)
    "shellcheck shellcheck"     # the kubernetes and cloud_run scripts: lint
    "chromium chromium"         # chat page tests (Playwright with executable_path)
    "ip iproute2"               # network namespaces in the egress tests
    "envsubst gettext-base"     # the egress proxy's entrypoint.sh renders nginx.conf (tests/system/test_egress_proxy.py)
    "curl curl"                 # the curl line quickstart.sh --serve prints (tests/e2e/test_quickstart.py)
)

pkgs=()
for entry in "${TOOLS[@]}"; do
    read -r cmd pkg <<<"$entry"
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || pkgs+=("$pkg")
done
if [ ${#pkgs[@]} -eq 0 ]; then
    echo "install-test-tools: all present"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Keep services (nginx) from starting at install: the tests start their own.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
echo "install-test-tools: installed ${pkgs[*]}"
