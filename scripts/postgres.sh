#!/usr/bin/env bash
# PostgreSQL for the tests, on 127.0.0.1:5432 with trust authentication (the
# machine's cluster). Idempotent: starts the installed cluster only when
# nothing answers yet, waits until it accepts connections, and exits non-zero
# with a clear message when it cannot. Each test creates and drops its own
# database on it.
#
#   TALLY_TEST_POSTGRES   the server URL (default postgres://postgres@127.0.0.1:5432)
set -euo pipefail

URL="${TALLY_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432}"
WAIT_SECONDS=30

fail() {
    echo "postgres.sh: $*" >&2
    exit 1
}

ready() {
    pg_isready -q -d "$URL/postgres" 2>/dev/null
}

command -v pg_isready >/dev/null || fail "pg_isready not found: install PostgreSQL (apt-get install postgresql)"

if ! ready; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        for version in $(ls /etc/postgresql); do
            pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
        done
    else
        fail "nothing answers at $URL and no cluster is installed to start"
    fi
fi
for _ in $(seq "$WAIT_SECONDS"); do
    if ready; then
        psql -q -d "$URL/postgres" -c 'SELECT 1' >/dev/null ||
            fail "PostgreSQL at $URL answers but refuses connections (trust auth for postgres expected)"
        echo "postgres.sh: PostgreSQL answers at $URL"
        exit 0
    fi
    sleep 1
done
fail "PostgreSQL at $URL did not accept connections within ${WAIT_SECONDS}s"
