#!/usr/bin/env python3
"""Publishes a fixed, scripted sequence of KV cache events through the REAL publisher classes of
vLLM (vllm/distributed/kv_events.py: ZmqEventPublisher, KVEventBatch, BlockStored, BlockRemoved,
AllBlocksCleared) or SGLang (sglang/srt/disaggregation/kv_events.py: the same names), installed
by scripts/setup-vllm.sh in .tools/vllm-venv. crates/kvgate/tests/engine_publishers.rs runs it
and checks what kvgate decodes and indexes.

    engine_publish.py vllm   --endpoint tcp://127.0.0.1:P --replay tcp://127.0.0.1:R \
        [--subscribers N] [--dump FILE]
    engine_publish.py sglang --endpoint ... (same options)
    engine_publish.py --check VLLM_VERSION SGLANG_VERSION

A publisher per data-parallel rank (vLLM: ranks 0 and 1, on port P + rank and R + rank, the
engines' own convention; SGLang: rank 0). For each rank:
1. phase 1 is published before anyone subscribes: a subscriber only gets it from the replay
   socket;
2. once N subscribers hold a TCP connection to every rank's PUB port (and a moment for their
   subscriptions to arrive), phase 2 is published live;
3. the payloads exactly as the publisher put them on the wire (its replay buffer: (seq, msgpack
   bytes)) go to --dump as JSON, then `done` is printed; the sockets stay up (for replay) until
   stdin closes or 120 s pass.

No vLLM or SGLang code is copied here: the classes are the installed ones. Only the way they are
loaded is special, so that no torch is needed (see load_vllm and load_sglang).
"""

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import json
import sys
import threading
import time
import types
from importlib.metadata import version
from pathlib import Path

BLOCK_SIZE = 4


# --- loading the installed modules without their heavy package __init__ files ------------------


def _site_dir(top: str) -> Path:
    """The installed package directory of `top`, found without importing it."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{top} is not installed (run scripts/setup-vllm.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _package(name: str, path: Path) -> None:
    """Registers package `name` with its real directory as __path__ but WITHOUT running its
    __init__.py, so that its light submodules import normally and the heavy __init__ (torch, the
    engine) never runs."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__package__ = name
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, mod)


def _module(name: str, **attrs) -> None:
    """A stand-in module holding `attrs`."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, mod)


def _annotated_value(path: Path, name: str):
    """Evaluates the module-level `name: T = value` of a source file without running the file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
            and node.value is not None
        ):
            return eval(compile(ast.Expression(node.value), str(path), "eval"), {})
    raise SystemExit(f"{name} not found in {path}")


def load_vllm():
    """vllm.distributed.kv_events, the installed file, without torch.

    `import vllm.distributed.kv_events` would run vllm/__init__.py and
    vllm/distributed/__init__.py (parallel_state imports torch), and the module itself imports
    vllm.config.kv_events (whose vllm/config/utils.py imports torch and pydantic) and
    vllm.v1.core.kv_cache_utils (the engine: torch, transformers, ...). So:
    - the packages vllm, vllm.config, vllm.distributed, vllm.utils, vllm.v1 and vllm.v1.core are
      registered without running their __init__.py;
    - vllm.envs, vllm.logger, vllm.logging_utils, vllm.utils.network_utils, vllm.config.kv_events
      and vllm.distributed.kv_events are the installed modules, imported normally;
    - two helpers are stood in for: vllm.config.utils.config (a pydantic-dataclass decorator;
      here the stdlib dataclass: it only decorates KVEventsConfig, which the publisher keeps as a
      description of itself) and vllm.v1.core.kv_cache_utils.ExternalBlockHash (a type alias;
      here evaluated from the installed kv_cache_utils.py's own definition, `bytes | int`).
    The event structs, their msgpack encoding and the ZMQ publisher are vLLM's, unchanged.
    """
    root = _site_dir("vllm")
    for pkg in ("vllm", "vllm.config", "vllm.distributed", "vllm.utils", "vllm.v1", "vllm.v1.core"):
        _package(pkg, root.joinpath(*pkg.split(".")[1:]))
    _module("vllm.config.utils", config=dataclasses.dataclass)
    _module(
        "vllm.v1.core.kv_cache_utils",
        ExternalBlockHash=_annotated_value(root / "v1/core/kv_cache_utils.py", "ExternalBlockHash"),
    )
    return importlib.import_module("vllm.distributed.kv_events")


def load_sglang():
    """sglang.srt.disaggregation.kv_events, the installed file, without torch.

    `import sglang.srt...` would run sglang/__init__.py (SGLang's frontend language, transformers
    patches); sglang/srt/utils/__init__.py imports the engine's common utilities (torch). Both
    packages are registered without running their __init__.py; everything the module imports
    (sglang.srt.runtime_context, sglang.srt.utils.network, msgspec, pyzmq, pydantic) is the
    installed code, unchanged.
    """
    root = _site_dir("sglang")
    _package("sglang", root)
    _package("sglang.srt", root / "srt")
    _package("sglang.srt.utils", root / "srt/utils")
    return importlib.import_module("sglang.srt.disaggregation.kv_events")


def check(vllm_version: str, sglang_version: str) -> None:
    """Exits non-zero unless both modules load, at these versions, without torch."""
    got = {"vllm": version("vllm"), "sglang": version("sglang")}
    want = {"vllm": vllm_version, "sglang": sglang_version}
    if got != want:
        raise SystemExit(f"installed {got}, wanted {want}")
    for load in (load_vllm, load_sglang):
        m = load()
        for cls in ("ZmqEventPublisher", "KVEventBatch", "BlockStored", "BlockRemoved", "AllBlocksCleared"):
            getattr(m, cls)
    if "torch" in sys.modules:
        raise SystemExit("torch was imported")
    print(f"ok: vllm {got['vllm']}, sglang {got['sglang']}, no torch")


# --- the scripted sequences -------------------------------------------------------------------
# crates/kvgate/tests/engine_publishers.rs expects exactly these: change both together.


def toks(start: int, n_blocks: int) -> list[int]:
    return list(range(start, start + n_blocks * BLOCK_SIZE))


# A block hash above i64::MAX (vLLM's int hashes are u64) and a 32-byte one (vLLM's default
# sha256 hashes are bytes).
BIG = 0xFEDC_BA98_7654_3210
BYTES_HASH = bytes(range(32))


def vllm_script(m):
    """{dp rank: (phase 1 batches, phase 2 batches)}; a batch is a list of events."""
    full = dict(kv_cache_spec_kind="full_attention")

    def stored(hashes, parent, tokens, group, medium="GPU", lora=None, **kw):
        return m.BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=BLOCK_SIZE,
            lora_id=None if lora is None else 7,
            medium=medium,
            lora_name=lora,
            group_idx=group,
            **kw,
        )

    rank0_phase1 = [
        [
            # A hybrid model: group 0 full attention, group 1 sliding window, same block hashes.
            stored([11, 12], None, toks(100, 2), 0, **full),
            stored([11, 12], None, toks(100, 2), 1, kv_cache_spec_kind="sliding_window",
                   kv_cache_spec_sliding_window=8),
            # With more full-attention layers than fit one group, a second full-attention group
            # holds the same blocks.
            stored([11, 12], None, toks(100, 2), 3, **full),
        ]
    ]
    rank0_phase2 = [
        [
            stored([13], 12, toks(108, 1), 0, session_id="s1", **full),
            # The sliding window moved on: group 1 drops block 11, which group 0 still holds.
            m.BlockRemoved(block_hashes=[11], medium="GPU", group_idx=1),
        ],
        [
            stored([BIG], None, toks(200, 1), 0, lora="adapter-a", **full),
            stored([BYTES_HASH], None, toks(300, 1), 0, **full),
            # Offloaded to CPU by a KV connector, and one a remote store reports.
            stored([14], 13, toks(112, 1), 0, medium="CPU", locality="LOCAL", **full),
            stored([15], None, toks(400, 1), 0, medium="CPU", locality="REMOTE", **full),
        ],
        [
            m.BlockRemoved(block_hashes=[BYTES_HASH], medium="GPU", group_idx=0),
            # A Mamba group (hybrid SSM): its state blocks are not a token prefix cache.
            stored([16], None, toks(500, 1), 2, kv_cache_spec_kind="mamba"),
        ],
    ]
    rank1_phase1 = [[stored([21], None, toks(600, 1), 0, kv_cache_spec_kind="mla_attention")]]
    rank1_phase2 = [
        [m.AllBlocksCleared()],
        [stored([22, 23], None, toks(700, 2), 0, kv_cache_spec_kind="mla_attention")],
    ]
    return {0: (rank0_phase1, rank0_phase2), 1: (rank1_phase1, rank1_phase2)}


def sglang_script(m):
    def stored(hashes, parent, tokens, medium="GPU", **kw):
        return m.BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=BLOCK_SIZE,
            lora_id=None,
            medium=medium,
            **kw,
        )

    phase1 = [[stored([31, 32], None, toks(800, 2))]]
    phase2 = [
        [
            # SGLang's hashes are signed 64-bit.
            stored([-5], 32, toks(808, 1), session_id="s1"),
            stored([33], None, toks(900, 1), cache_salt="tenant-1"),
            stored([34], None, toks(1000, 1), lora_name="adapter-b"),
        ],
        [
            stored([35], None, toks(1100, 1), medium=m.StorageMedium.CPU.value),
            stored([36], None, toks(1200, 1), medium=m.StorageMedium.DISK.value),
            m.BlockRemoved(block_hashes=[34], medium="GPU"),
        ],
    ]
    return {0: (phase1, phase2)}


# --- driving the publishers ---------------------------------------------------------------------


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def wait_sent(pub, n: int, deadline: float) -> None:
    """Until the publisher's thread has sent (and buffered for replay) `n` batches."""
    while len(pub._buffer) < n:
        if time.time() > deadline:
            raise SystemExit(f"publisher sent {len(pub._buffer)} of {n} batches")
        time.sleep(0.01)


def wait_subscribers(ports: list[int], n: int, deadline: float) -> None:
    """Until every port has `n` established TCP connections from subscribers."""
    import psutil

    me = psutil.Process()
    while True:
        conns = [c for c in me.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED]
        counts = {p: sum(1 for c in conns if c.laddr.port == p) for p in ports}
        if all(v >= n for v in counts.values()):
            return
        if time.time() > deadline:
            raise SystemExit(f"subscribers connected per port: {counts}, wanted {n}")
        time.sleep(0.05)


def run(engine: str, endpoint: str, replay: str, subscribers: int, dump: str | None) -> None:
    m = load_vllm() if engine == "vllm" else load_sglang()
    script = vllm_script(m) if engine == "vllm" else sglang_script(m)
    deadline = time.time() + 30
    pubs = {}
    for rank in script:
        if engine == "vllm":
            pubs[rank] = m.ZmqEventPublisher(
                data_parallel_rank=rank, endpoint=endpoint, replay_endpoint=replay
            )
        else:
            pubs[rank] = m.ZmqEventPublisher(
                attn_dp_rank=rank, endpoint=endpoint, replay_endpoint=replay, bind=True
            )
    ts = 1_700_000_000.0
    sent = {}
    for phase in (0, 1):
        for rank, pub in pubs.items():
            for i, events in enumerate(script[rank][phase]):
                # The engines' schedulers publish `KVEventBatch(ts=time.time(), events=...)`;
                # a fixed ts keeps the bytes deterministic. The rank is filled in by publish().
                pub.publish(m.KVEventBatch(ts=ts + phase * 10 + i, events=events))
                sent[rank] = sent.get(rank, 0) + 1
        for rank, pub in pubs.items():
            wait_sent(pub, sent[rank], deadline)
        if phase == 0:
            print(f"ready {engine} ranks {sorted(pubs)}", flush=True)
            ports = [port_of(endpoint) + r for r in pubs]
            wait_subscribers(ports, subscribers, deadline)
            # The subscriptions follow the connections: give them a moment (a live batch lost
            # anyway is recovered through replay, triggered by any later one).
            time.sleep(0.5)
    if dump:
        out = {str(r): [[seq, payload.hex()] for seq, payload in p._buffer] for r, p in pubs.items()}
        Path(dump).write_text(json.dumps(out))
    print("done", flush=True)
    # Keep the sockets (and the replay ROUTER) up until the test lets go.
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait(120)
    for pub in pubs.values():
        pub.shutdown()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", choices=["vllm", "sglang"])
    ap.add_argument("--endpoint", required=True, help="PUB endpoint of rank 0 (tcp://host:port)")
    ap.add_argument("--replay", required=True, help="replay ROUTER endpoint of rank 0")
    ap.add_argument("--subscribers", type=int, default=1, help="subscribers to wait for")
    ap.add_argument("--dump", help="write the published (seq, payload) per rank here")
    a = ap.parse_args()
    run(a.engine, a.endpoint, a.replay, a.subscribers, a.dump)


if __name__ == "__main__":
    main()
