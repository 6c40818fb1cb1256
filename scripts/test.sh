#!/usr/bin/env bash
# The test command (README and .ci/run both call it): installs retailklip with its test extras,
# checks the import-layering contract (import-linter), starts a throwaway PostgreSQL server on
# 127.0.0.1 for the PostgreSQL tests (installing Debian's `postgresql` package if it is
# missing), runs pytest, stops the server and exits with
# pytest's exit code.  Arguments are passed to pytest (e.g. `bash scripts/test.sh -k postgres`).
#
# Set RETAILKLIP_TEST_PG_URL to use an existing server instead (a role that may CREATE DATABASE).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
}

start_postgres() {
    local bin pgtmp port password
    bin=$(pg_bindir)
    if [ -z "$bin" ]; then
        echo "scripts/test.sh: installing PostgreSQL (Debian package postgresql)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        bin=$(pg_bindir)
        [ -n "$bin" ] || { echo "scripts/test.sh: no initdb after installing postgresql" >&2; exit 1; }
    fi
    # initdb refuses to run as root: the server runs as the postgres user (or as ourselves).
    RUN_PG=()
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
        if command -v runuser >/dev/null; then RUN_PG=(runuser -u postgres --); else RUN_PG=(su postgres -s /bin/sh -c '"$0" "$@"'); fi
    fi
    pgtmp=$(mktemp -d "${TMPDIR:-/tmp}/retailklip-pg.XXXXXX")
    PG_TMP=$pgtmp
    PG_BIN=$bin
    [ "$(id -u)" = 0 ] && chown postgres: "$pgtmp"
    chmod 700 "$pgtmp"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    (cd "$pgtmp" && "${RUN_PG[@]}" "$bin/initdb" -D "$pgtmp/data" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync >"$pgtmp/initdb.log" 2>&1) \
        || { cat "$pgtmp/initdb.log" >&2; exit 1; }
    (cd "$pgtmp" && "${RUN_PG[@]}" "$bin/pg_ctl" -D "$pgtmp/data" -l "$pgtmp/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $pgtmp -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null) || { cat "$pgtmp/server.log" >&2; exit 1; }
    PG_STARTED=1
    (cd "$pgtmp" && "${RUN_PG[@]}" "$bin/psql" -q -v ON_ERROR_STOP=1 -h "$pgtmp" -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE retailklip LOGIN CREATEDB PASSWORD '$password'" \
        -c "CREATE DATABASE retailklip_test OWNER retailklip") >/dev/null
    export RETAILKLIP_TEST_PG_URL="postgresql+psycopg://retailklip:$password@127.0.0.1:$port/retailklip_test"
    echo "scripts/test.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
}

stop_postgres() {
    if [ -n "${PG_STARTED:-}" ]; then
        (cd "$PG_TMP" && "${RUN_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate -w stop >/dev/null 2>&1) || true
    fi
    if [ -n "${PG_TMP:-}" ]; then rm -rf "$PG_TMP"; fi
}
trap stop_postgres EXIT

python3 -m pip install -q -e ".[test,postgres,ray]"
# The layering contract (pyproject.toml [tool.importlinter]): the library core imports neither
# the catalog nor the training code.  A broken contract fails the run before any test.
lint-imports --no-cache
if [ -z "${RETAILKLIP_TEST_PG_URL:-}" ]; then start_postgres; fi
set +e
# Two pytest workers (pytest-xdist), one file per worker at a time, one torch thread each: the
# suite is CPU-bound and CI machines have 2 cores.  RETAILKLIP_TEST_WORKERS=0 runs serially.
# A run must end, with a report, whatever goes wrong:
# - --max-worker-restart=0: a worker that dies (a crash, the OOM killer) fails the run at once,
#   naming the test it was running; replacing it can make the --dist loadfile scheduler of
#   pytest-xdist 3.8 wait forever (pytest-dev/pytest-xdist#1323, #1371).
# - --timeout (pytest-timeout): one test, its fixtures included, fails after this many seconds
#   (the slowest, the loop test's fixture, takes 72-125 s here).
# - timeout(1): SIGINT (pytest prints its summary) after RETAILKLIP_TEST_TOTAL_S, SIGKILL 2 min later.
timeout --signal=INT --kill-after=120 "${RETAILKLIP_TEST_TOTAL_S:-2700}" \
    python3 -m pytest -q -n "${RETAILKLIP_TEST_WORKERS:-2}" --dist loadfile --max-worker-restart=0 \
    --timeout "${RETAILKLIP_TEST_TIMEOUT_S:-1200}" --durations=15 "$@"
rc=$?
set -e
exit "$rc"
