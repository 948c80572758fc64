#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate.
# Works on a fresh machine of the project's kind (Rust toolchain present);
# the embedded SQLite store needs no service.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked
