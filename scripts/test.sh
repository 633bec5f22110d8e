#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test. Idempotent; installs what it
# needs (into ./.tools, ignored by git) through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# A one-off build gains nothing from incremental caches, which cost gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== doc tests"
# first: nextest (below) does not run them, and its summary should close the run
cargo test --workspace --locked --doc --quiet

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  echo "(cargo-nextest not found: using cargo test)"
  cargo test --workspace --locked --no-fail-fast
fi
