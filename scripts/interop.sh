#!/usr/bin/env bash
# kvgate's EPP next to Dynamo 1.6.1's own kv router and round-robin, on the same real Dynamo
# workers (scripts/interop.py says how). Installs what it needs (scripts/setup.sh, idempotent),
# builds kvgate, then runs the comparison; the last line printed is one JSON object:
#   {"kvgate_hit": .., "dynamo_hit": .., "round_robin_hit": .., "errors": n, "events_decoded": e, "events_failed": f, ...}
# Arguments are passed to scripts/interop.py (--conversations, --turns, --concurrency, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
cargo build -q --locked -p kvgate >&2
exec .tools/dynamo-venv/bin/python scripts/interop.py "$@"
