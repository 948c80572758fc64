#!/usr/bin/env bash
# A NATS server with JetStream for the tests, on 127.0.0.1:4222. Idempotent:
# installs Debian's nats-server when it is missing, starts it only when no
# server answers on the port yet, waits until it answers with JetStream on,
# and exits non-zero with a clear message when it cannot.
#
#   TALLY_NATS_PORT   the port (default 4222)
set -euo pipefail

HOST=127.0.0.1
PORT="${TALLY_NATS_PORT:-4222}"
BIN=/usr/sbin/nats-server
if [ "$PORT" = 4222 ]; then
    STORE=/var/lib/nats-server
    LOG=/var/log/nats-server.log
else
    STORE="/var/lib/nats-server-$PORT"
    LOG="/var/log/nats-server-$PORT.log"
fi
# Per port, so that a server on another port does not count as this one.
PIDFILE="/run/nats-server-$PORT.pid"
WAIT_SECONDS=30

fail() {
    echo "nats.sh: $*" >&2
    exit 1
}

# 0: NATS with JetStream answers; 1: nothing listens; 2: something listens
# that is not NATS; 3: NATS without JetStream. A NATS server speaks first (its
# INFO line), so this sends nothing and the server logs no error. The line
# read is left in $ANSWER.
ANSWER=""
probe() {
    local out
    out="$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/$HOST/$PORT" || exit 1
        IFS= read -r -t 2 line <&3 || line=""
        printf 'open %s\n' "$line"
    )" || return 1
    ANSWER="${out#open }"
    case "$ANSWER" in
    INFO*'"jetstream":true'*) return 0 ;;
    INFO*) return 3 ;;
    *) return 2 ;;
    esac
}

check() {
    case "$1" in
    2) fail "something listens on $HOST:$PORT but it is not a NATS server (it said: ${ANSWER:0:120})" ;;
    3) fail "the NATS server on $HOST:$PORT runs without JetStream (start it with -js)" ;;
    esac
}

status=0
probe || status=$?
if [ "$status" = 0 ]; then
    echo "nats.sh: nats-server with JetStream already answers on $HOST:$PORT"
    exit 0
fi
check "$status"

if [ ! -x "$BIN" ]; then
    echo "nats.sh: installing nats-server (Debian package)"
    [ "$(id -u)" = 0 ] || fail "$BIN is missing and installing it needs root (apt-get install nats-server)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq nats-server >/dev/null || fail "apt-get install nats-server failed"
    [ -x "$BIN" ] || fail "the nats-server package did not install $BIN"
fi
command -v start-stop-daemon >/dev/null || fail "start-stop-daemon is needed to start nats-server"

mkdir -p "$STORE" || fail "cannot create $STORE"
echo "nats.sh: starting nats-server with JetStream on $HOST:$PORT (store $STORE, log $LOG)"
start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$PIDFILE" --exec "$BIN" -- \
    -a "$HOST" -p "$PORT" -js -sd "$STORE" -l "$LOG" ||
    fail "start-stop-daemon could not start $BIN (see $LOG)"

for _ in $(seq 1 $((WAIT_SECONDS * 10))); do
    status=0
    probe || status=$?
    if [ "$status" = 0 ]; then
        echo "nats.sh: nats-server with JetStream answers on $HOST:$PORT"
        exit 0
    fi
    check "$status"
    sleep 0.1
done
echo "nats.sh: the last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2 2>/dev/null || true
fail "nats-server did not answer with JetStream on $HOST:$PORT within $WAIT_SECONDS s"
