#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: checks the toolchain and fetches crates. External tools
# that later test suites need (Envoy, nats-server, tokenizer files) are installed here, into
# ./.tools (ignored by git), as those suites arrive.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) — rust-toolchain.toml pins the version" >&2
  exit 1
fi
mkdir -p .tools
cargo fetch --locked >/dev/null
