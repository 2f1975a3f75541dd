#!/bin/bash
# Entry point of the local PostgreSQL image: the part of the official image's
# docker-entrypoint.sh this project uses. An empty PGDATA gets initdb (superuser postgres,
# auth POSTGRES_HOST_AUTH_METHOD, default scram-sha-256 with POSTGRES_PASSWORD) and the
# database POSTGRES_DB; then the command runs as the postgres user (PostgreSQL refuses root).
set -euo pipefail
if [[ ${1:-} == -* ]]; then set -- postgres "$@"; fi
if [[ ${1:-} != postgres || $(id -u) != 0 ]]; then exec "$@"; fi
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres: "$PGDATA" /var/run/postgresql
chmod 0700 "$PGDATA"
if [[ ! -s $PGDATA/PG_VERSION ]]; then
    auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
    pwfile=()
    if [[ -n ${POSTGRES_PASSWORD:-} ]]; then
        printf '%s\n' "$POSTGRES_PASSWORD" >/tmp/pwfile && chown postgres: /tmp/pwfile
        pwfile=(--pwfile=/tmp/pwfile)
    elif [[ $auth != trust ]]; then
        echo "docker-entrypoint.sh: set POSTGRES_PASSWORD or POSTGRES_HOST_AUTH_METHOD=trust" >&2
        exit 1
    fi
    runuser -u postgres -- initdb -D "$PGDATA" -U postgres --auth-local=trust --auth-host="$auth" \
        --encoding=UTF8 --no-locale "${pwfile[@]}" >/dev/null
    rm -f /tmp/pwfile
    echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    db="${POSTGRES_DB:-postgres}"
    if [[ $db != postgres ]]; then
        echo "CREATE DATABASE \"$db\"" |
            runuser -u postgres -- postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
fi
exec runuser -u postgres -- "$@"
