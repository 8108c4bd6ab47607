#!/bin/sh
# Start redis-server with the password from REDIS_PASSWORD. It goes into a config file
# that only this user reads, not onto the command line, where the host's `ps` would show
# it; its characters are checked first, so it cannot change the configuration.
set -eu
case ${REDIS_PASSWORD:-} in
    "" | *[!A-Za-z0-9_-]*)
        echo "redis: REDIS_PASSWORD must be set, made of [A-Za-z0-9_-]" >&2
        exit 2 ;;
esac
umask 077
# Routes only, in memory: a restart loses them (the main README's failure table says what
# that costs); the conversations are on the sessions' volumes.
printf 'bind 0.0.0.0\nprotected-mode no\nsave ""\nappendonly no\nrequirepass "%s"\n' "$REDIS_PASSWORD" >/tmp/redis.conf
exec redis-server /tmp/redis.conf
