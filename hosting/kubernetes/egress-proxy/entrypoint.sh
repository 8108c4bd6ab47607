#!/bin/sh
# Start the egress proxy: check the settings and the key, render nginx.conf and the key
# include into a private run dir, then become nginx (in the foreground, as PID 1).
#
# Why the key goes into an include file rendered here, and not into an environment
# variable: nginx passes its environment to no directive, and reading a variable into a
# header takes the perl or njs module, a scripting runtime in the one process that holds
# the key, for one string. A file written once from the mounted Secret, on a memory-backed
# volume that only this user can read, keeps nginx plain; and the key's characters are
# checked first, so a quote, semicolon or newline cannot change the configuration.
#
# Every setting has the production default; the tests point them at a stand-in upstream.
set -eu

: "${EGRESS_UPSTREAM_HOST:=api.anthropic.com}"
: "${EGRESS_UPSTREAM_PORT:=443}"
: "${EGRESS_CA_FILE:=/etc/ssl/certs/ca-certificates.crt}"
: "${EGRESS_SERVER_NAMES:=egress-proxy}"
: "${EGRESS_PORT:=8080}"
: "${EGRESS_HEALTH_PORT:=8081}"
: "${EGRESS_RUNNER_PORT:=8082}"
: "${EGRESS_KEY_FILE:=/etc/egress-proxy-key/api-key}"
: "${EGRESS_RUN_DIR:=/tmp/egress-proxy}"
: "${EGRESS_TEMPLATE:=$(dirname "$0")/nginx.conf.template}"
export EGRESS_UPSTREAM_HOST EGRESS_UPSTREAM_PORT EGRESS_CA_FILE EGRESS_SERVER_NAMES \
    EGRESS_PORT EGRESS_HEALTH_PORT EGRESS_RUNNER_PORT EGRESS_RUN_DIR

fail() {
    echo "egress-proxy: $*" >&2
    exit 2
}

# Each value lands inside an nginx directive: only the characters its kind needs.
check() {
    case $2 in
        "" | *[!$3]*) fail "$1 must be non-empty and made of [$3]" ;;
    esac
}
check EGRESS_UPSTREAM_HOST "$EGRESS_UPSTREAM_HOST" 'a-zA-Z0-9.-'
check EGRESS_UPSTREAM_PORT "$EGRESS_UPSTREAM_PORT" '0-9'
check EGRESS_PORT "$EGRESS_PORT" '0-9'
check EGRESS_HEALTH_PORT "$EGRESS_HEALTH_PORT" '0-9'
check EGRESS_RUNNER_PORT "$EGRESS_RUNNER_PORT" '0-9'
check EGRESS_SERVER_NAMES "$EGRESS_SERVER_NAMES" 'a-z0-9. -'
check EGRESS_CA_FILE "$EGRESS_CA_FILE" 'a-zA-Z0-9._/-'
check EGRESS_RUN_DIR "$EGRESS_RUN_DIR" 'a-zA-Z0-9._/-'
[ -r "$EGRESS_CA_FILE" ] || fail "cannot read the CA bundle EGRESS_CA_FILE=$EGRESS_CA_FILE"
[ -r "$EGRESS_TEMPLATE" ] || fail "cannot read the config template EGRESS_TEMPLATE=$EGRESS_TEMPLATE"
[ -r "$EGRESS_KEY_FILE" ] || fail "cannot read the key file EGRESS_KEY_FILE=$EGRESS_KEY_FILE (mount the egress-proxy-key Secret)"
key=$(cat "$EGRESS_KEY_FILE")
case $key in
    "" | *[!A-Za-z0-9_-]*) fail "the key in $EGRESS_KEY_FILE is empty or holds characters other than [A-Za-z0-9_-]" ;;
esac

umask 077
mkdir -p "$EGRESS_RUN_DIR"
printf 'proxy_set_header x-api-key "%s";\n' "$key" >"$EGRESS_RUN_DIR/key.conf"
unset key
# shellcheck disable=SC2016  # the names are envsubst's, not the shell's
envsubst '${EGRESS_UPSTREAM_HOST} ${EGRESS_UPSTREAM_PORT} ${EGRESS_CA_FILE} ${EGRESS_SERVER_NAMES} ${EGRESS_PORT} ${EGRESS_HEALTH_PORT} ${EGRESS_RUNNER_PORT} ${EGRESS_RUN_DIR}' \
    <"$EGRESS_TEMPLATE" >"$EGRESS_RUN_DIR/nginx.conf"
exec nginx -e stderr -c "$EGRESS_RUN_DIR/nginx.conf" -g 'daemon off;'
