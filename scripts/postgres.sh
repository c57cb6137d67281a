#!/usr/bin/env bash
# Gets a local PostgreSQL ready for Sagaflow's PostgreSQL store and its tests, on
# Debian or Ubuntu:
#
#   1. installs the `postgresql` package if `psql` or `pg_ctlcluster` is missing
#      (apt-get; through sudo unless run as root);
#   2. starts the newest cluster named `main` under /etc/postgresql
#      (`pg_ctlcluster --skip-systemctl-redirect VERSION main start`, so it works in a
#      container without systemd), or `service postgresql start` if that fails;
#   3. waits until `pg_isready -h 127.0.0.1 -p PORT` answers;
#   4. creates the database `test` if it does not exist;
#   5. checks that user postgres can connect over TCP to 127.0.0.1 without a password,
#      which is what the tests' default URL does;
#   6. prints the URLs to use, as `export` lines on standard output
#      (`eval "$(scripts/postgres.sh)"` sets them).
#
# About step 5: Debian's default pg_hba.conf asks for a password on TCP connections.
# This script changes pg_hba.conf in one case only: it runs as root AND it installed
# PostgreSQL (or created its cluster) in this run: a fresh install, nothing of anybody's
# to break. Then it puts `host all all 127.0.0.1/32 trust` first in pg_hba.conf and
# reloads the server.
# That lets every local user connect as any database user without a password: fine on a
# throwaway development or CI machine, not on a shared one. In every other case it
# changes nothing and prints what to change, then exits 1.
#
# Running it again is fine: each step is skipped when already done.
#
# Environment: SAGAFLOW_PG_DB (default `test`) names the database to create.

set -euo pipefail

DB="${SAGAFLOW_PG_DB:-test}"
HOST=127.0.0.1
PORT=5432
TRUST_LINE="host all all 127.0.0.1/32 trust"
FRESH=0

say() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly when root, else through sudo.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root, or install sudo)"
    fi
}

# Runs a command as the database superuser `postgres`, over the local socket (Debian
# lets the OS user postgres in by peer authentication). From / so that a home
# directory postgres cannot read does not produce warnings.
as_postgres() {
    if [ "$(id -un)" = postgres ]; then
        (cd / && "$@")
    elif is_root; then
        (cd / && runuser -u postgres -- "$@")
    elif command -v sudo >/dev/null 2>&1; then
        (cd / && sudo -u postgres -- "$@")
    else
        die "need to run as user postgres for: $* (run as root, or install sudo)"
    fi
}

# 1. Install.
if ! command -v psql >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 \
        || die "psql or pg_ctlcluster is missing and there is no apt-get: install PostgreSQL by hand"
    say "installing PostgreSQL (apt-get install -y postgresql)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
    FRESH=1
fi

# 2. Start. The newest version with a cluster `main`; the package creates one at install.
VERSION=""
if [ -d /etc/postgresql ]; then
    # shellcheck disable=SC2012 # version directories: digits and dots only
    for v in $(ls -1 /etc/postgresql 2>/dev/null | sort -V); do
        if [ -f "/etc/postgresql/$v/main/postgresql.conf" ]; then
            VERSION="$v"
        fi
    done
fi
if [ -z "$VERSION" ] && command -v pg_createcluster >/dev/null 2>&1 && [ -d /usr/lib/postgresql ]; then
    # Installed, but without a cluster (it was dropped, or the package was told not to
    # create one): create `main` for the newest server installed.
    # shellcheck disable=SC2012 # as above
    v="$(ls -1 /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)"
    if [ -n "$v" ]; then
        say "creating cluster $v/main"
        as_root pg_createcluster "$v" main
        VERSION="$v"
        FRESH=1
    fi
fi
if [ -n "$VERSION" ] && command -v pg_lsclusters >/dev/null 2>&1; then
    # The cluster's own port (5432 unless another cluster had it first).
    p="$(pg_lsclusters -h 2>/dev/null | awk -v v="$VERSION" '$1 == v && $2 == "main" { print $3 }')"
    if [ -n "$p" ]; then
        PORT="$p"
    fi
fi

if pg_isready -q -h "$HOST" -p "$PORT"; then
    say "PostgreSQL is running on $HOST:$PORT"
else
    started=0
    if [ -n "$VERSION" ]; then
        say "starting cluster $VERSION/main"
        if as_root pg_ctlcluster --skip-systemctl-redirect "$VERSION" main start; then
            started=1
        fi
    fi
    if [ "$started" -eq 0 ]; then
        say "starting with: service postgresql start"
        as_root service postgresql start || die "could not start PostgreSQL"
    fi
fi

# 3. Wait (at most 30 s).
for _ in $(seq 1 60); do
    if pg_isready -q -h "$HOST" -p "$PORT"; then
        break
    fi
    sleep 0.5
done
pg_isready -h "$HOST" -p "$PORT" >/dev/null \
    || die "PostgreSQL does not answer on $HOST:$PORT after 30 s; see /var/log/postgresql/"

# 4. The database.
case "$DB" in
    *[!a-z0-9_]* | "") die "SAGAFLOW_PG_DB=$DB: use lowercase letters, digits and underscores" ;;
esac
if [ "$(as_postgres psql -p "$PORT" -XtAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    say "creating database $DB"
    as_postgres createdb -p "$PORT" "$DB"
fi

# 5. TCP as postgres, without a password. libpq would use PGPASSWORD or ~/.pgpass;
# the engine (tokio-postgres) reads neither, so the check must not either.
URL_KV="host=$HOST port=$PORT user=postgres dbname=$DB"
URL="postgres://postgres@$HOST:$PORT/$DB"
tcp_works() {
    env -u PGPASSWORD PGPASSFILE=/nonexistent/sagaflow-pgpass \
        psql "$URL_KV" -w -XtAc 'SELECT 1' >/dev/null 2>&1
}

if ! tcp_works; then
    HBA="$(as_postgres psql -p "$PORT" -XtAc 'SHOW hba_file' 2>/dev/null || true)"
    if is_root && [ "$FRESH" -eq 1 ] && [ -n "$HBA" ] && [ -f "$HBA" ]; then
        # A fresh install made by this run, as root: nothing of anybody's to break.
        if ! grep -qxF "$TRUST_LINE" "$HBA"; then
            say "fresh install: adding '$TRUST_LINE' at the top of $HBA"
            tmp="$(mktemp)"
            {
                printf '# Added by sagaflow scripts/postgres.sh on a fresh install: local TCP\n'
                printf '# connections need no password (development and CI machines only).\n'
                printf '%s\n\n' "$TRUST_LINE"
                cat "$HBA"
            } >"$tmp"
            # Written into the existing file, so that its owner and mode stay.
            cat "$tmp" >"$HBA"
            rm -f "$tmp"
        fi
        as_postgres psql -p "$PORT" -XtAc 'SELECT pg_reload_conf()' >/dev/null
        sleep 0.5
    fi
fi

if ! tcp_works; then
    say "PostgreSQL runs, but user postgres cannot connect over TCP to $HOST:$PORT without a password."
    say "Either let local TCP connections in without one, in ${HBA:-pg_hba.conf (psql -c 'SHOW hba_file' as postgres)}:"
    say "    put this line above the other 'host' lines:  $TRUST_LINE"
    say "    then reload:  sudo -u postgres psql -c 'SELECT pg_reload_conf()'"
    say "    (anyone on this machine can then connect as any database user: development machines only)"
    say "Or give postgres a password and put it in the URL the tests use:"
    say "    export SAGAFLOW_TEST_DATABASE_URL='$URL_KV password=...'"
    exit 1
fi

# 6. What to use: on standard output, so that `eval "$(scripts/postgres.sh)"` sets both.
say "ready: database $DB on $HOST:$PORT, user postgres, no password"
cat <<EOF
export SAGAFLOW_TEST_DATABASE_URL='$URL_KV'
export DATABASE_URL='$URL'
EOF
