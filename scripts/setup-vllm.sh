#!/usr/bin/env bash
# Idempotent: the real KV-event publishers of vLLM and SGLang in ./.tools/vllm-venv, for the test
# crates/kvgate/tests/engine_publishers.rs (driven by scripts/engine_publish.py). Quiet when the
# pinned versions are already there. Called by scripts/setup.sh.
#
# What is installed, and why so little:
# - vLLM and SGLang from PyPI with --no-deps: we want their event classes
#   (vllm/distributed/kv_events.py, sglang/srt/disaggregation/kv_events.py), not an engine. Their
#   declared dependencies pull in torch, CUDA libraries and much more (gigabytes).
# - The few pinned packages those two modules and the helpers they import need at import time:
#   msgspec (the event structs and the msgpack encoder), pyzmq (the PUB and replay ROUTER sockets),
#   psutil and urllib3 (vllm/utils/network_utils.py), pydantic and its own dependencies (SGLang's
#   KVEventsConfig is a pydantic model).
# - No torch. A plain `import vllm.distributed.kv_events` would import vllm/__init__.py,
#   vllm/distributed/__init__.py (parallel_state: torch), vllm/config/utils.py (torch) and
#   vllm/v1/core/kv_cache_utils.py (the whole engine); `import sglang.srt...` would run
#   sglang/__init__.py (the frontend language, transformers). scripts/engine_publish.py therefore
#   registers the parent packages without running their __init__.py and executes the installed
#   module files themselves; only two helpers that need torch are stood in for, both with
#   vLLM's own text (see load_vllm() there). `engine_publish.py --check` proves the modules load,
#   with these versions and without torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.tools/vllm-venv"

VLLM_VERSION=0.34.0
SGLANG_VERSION=0.5.23
PINS=(
  "vllm==$VLLM_VERSION"
  "sglang==$SGLANG_VERSION"
  "msgspec==0.23.0"
  "pyzmq==27.3.0"
  "psutil==7.2.2"
  "urllib3==2.8.0"
  "pydantic==2.14.3"
  "pydantic-core==2.50.4"
  "typing-extensions==4.16.0"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
)

check() {
  "$VENV/bin/python" scripts/engine_publish.py --check "$VLLM_VERSION" "$SGLANG_VERSION" >/dev/null 2>&1
}

if [ -x "$VENV/bin/python" ] && check; then
  exit 0
fi

echo "setup: installing vLLM $VLLM_VERSION and SGLang $SGLANG_VERSION (their KV event publishers, no torch) into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# --no-deps for every package: the list above is the whole environment, pinned.
if ! "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "${PINS[@]}"; then
  echo "setup: pip could not install ${PINS[*]}" >&2
  exit 1
fi
if ! check; then
  echo "setup: the vLLM/SGLang KV event modules do not load from $VENV:" >&2
  "$VENV/bin/python" scripts/engine_publish.py --check "$VLLM_VERSION" "$SGLANG_VERSION" >&2 || true
  exit 1
fi
