#!/usr/bin/env python3
"""kvgate next to NVIDIA Dynamo 1.6.1's own router, on the same real Dynamo workers.

Starts nats-server, real Dynamo mockers (`python -m dynamo.mocker`, file discovery, KV events on
NATS) and three entry points over those same workers:
  - kvgate: real Envoy -> `kvgate epp` (workers from Dynamo's discovery store, events from the
    workers over NATS) -> a real `python -m dynamo.frontend --router-mode direct` sidecar;
  - dynamo: `python -m dynamo.frontend --router-mode kv` (Dynamo's own KV router);
  - round_robin: `python -m dynamo.frontend --router-mode round-robin`.
Each runs the same multi-turn workload (its own text, so no router profits from a cache another
filled), and the hit rate is what the workers themselves report: the sum of
usage.prompt_tokens_details.cached_tokens over the sum of prompt_tokens. The last line printed is
one JSON object:
  {"kvgate_hit", "dynamo_hit", "round_robin_hit", "errors", "events_decoded", "events_failed", ...}

Run through scripts/interop.sh (it installs the tools and builds kvgate first).
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, ".tools")
PY = os.path.join(TOOLS, "dynamo-venv", "bin", "python")
MODEL = os.path.join(TOOLS, "dynamo-model")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, logdir):
        self.procs = []
        self.logdir = logdir

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.logdir, name + ".log"), "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def check(self):
        for name, p in self.procs:
            if p.poll() is not None:
                tail = open(os.path.join(self.logdir, name + ".log"), "rb").read()[-2000:].decode(errors="replace")
                raise SystemExit(f"interop: {name} exited with {p.returncode}:\n{tail}")

    def stop(self):
        for _, p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait(what, cond, procs, secs=90):
    deadline = time.time() + secs
    while True:
        procs.check()
        try:
            if cond():
                return
        except Exception:
            pass
        if time.time() > deadline:
            raise SystemExit(f"interop: timed out waiting for {what}")
        time.sleep(0.2)


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def models_ready(url):
    return json.loads(get(url + "/v1/models"))["data"][0]["id"] == "qwen"


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def conversations(tag, n, turns, seed, system_words, user_words):
    rng = random.Random(seed)
    vocab = [f"{tag}{w}" for w in ("alpha", "bravo", "cargo", "delta", "ember", "fjord", "gamma", "harbor",
                                    "iris", "jolt", "kilo", "lumen", "mango", "nova", "orbit", "prism")]
    convs = []
    for c in range(n):
        system = f"session {tag}-{c}. " + " ".join(rng.choice(vocab) + str(rng.randrange(1000))
                                                  for _ in range(system_words))
        users = [f"question {t}: " + " ".join(rng.choice(vocab) + str(rng.randrange(1000))
                                            for _ in range(user_words)) for t in range(turns)]
        convs.append((system, users))
    return convs


async def run_workload(url, convs, concurrency, max_tokens):
    # "ttft" is the whole request's latency here (non-streaming requests).
    stats = {"requests": 0, "errors": 0, "prompt_tokens": 0, "cached_tokens": 0, "ttft": []}
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(system, users):
            async with sem:
                messages = [{"role": "system", "content": system}]
                for u in users:
                    messages.append({"role": "user", "content": u})
                    body = {"model": "qwen", "messages": messages, "max_tokens": max_tokens}
                    stats["requests"] += 1
                    t0 = time.time()
                    try:
                        async with session.post(url + "/v1/chat/completions", json=body) as r:
                            text = await r.text()
                            if r.status != 200:
                                stats["errors"] += 1
                                print(f"interop: {url} answered {r.status}: {text[:300]}", file=sys.stderr)
                                return
                            v = json.loads(text)
                    except Exception as e:  # noqa: BLE001 - any failure is an error to count
                        stats["errors"] += 1
                        print(f"interop: {url}: {e!r}", file=sys.stderr)
                        return
                    stats["ttft"].append(time.time() - t0)
                    usage = v.get("usage") or {}
                    stats["prompt_tokens"] += usage.get("prompt_tokens", 0)
                    stats["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
                    reply = v["choices"][0]["message"].get("content") or ""
                    messages.append({"role": "assistant", "content": reply})
        await asyncio.gather(*(one(s, u) for s, u in convs))
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvgate", default=os.path.join(ROOT, "target", "debug", "kvgate"))
    ap.add_argument("--workers", type=int, default=2, help="Dynamo mocker workers")
    ap.add_argument("--dp-size", type=int, default=2, help="data-parallel ranks per worker")
    ap.add_argument("--blocks-per-rank", type=int, default=640,
                    help="KV blocks per rank (small enough that the caches evict)")
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--speedup", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the routers (odd ones in reverse order)")
    ap.add_argument("--keep-logs", action="store_true")
    a = ap.parse_args()

    for path, what in ((PY, "ai-dynamo (run scripts/setup.sh)"), (MODEL, "the Dynamo model dir (scripts/setup.sh)"),
                       (os.path.join(TOOLS, "bin", "envoy"), "Envoy (scripts/setup.sh)"),
                       (os.path.join(TOOLS, "bin", "nats-server"), "nats-server (scripts/setup.sh)"),
                       (a.kvgate, "the kvgate binary (cargo build -p kvgate)")):
        if not os.path.exists(path):
            raise SystemExit(f"interop: {path} missing: {what}")

    work = tempfile.mkdtemp(prefix="kvgate-interop-")
    store = os.path.join(work, "store")
    os.makedirs(store)
    procs = Procs(work)
    try:
        nats_port = free_port()
        nats_url = f"nats://127.0.0.1:{nats_port}"
        procs.start("nats", [os.path.join(TOOLS, "bin", "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                             "-sd", os.path.join(work, "js")])
        dyn_env = {"DYN_FILE_KV": store, "NATS_SERVER": nats_url, "DYN_LOG": "warn", "HF_HUB_OFFLINE": "1"}
        procs.start("mockers", [PY, "-m", "dynamo.mocker", "--model-path", MODEL, "--model-name", "qwen",
                                "--discovery-backend", "file", "--event-plane", "nats", "--request-plane", "tcp",
                                "--num-workers", str(a.workers), "--data-parallel-size", str(a.dp_size),
                                "--speedup-ratio", str(a.speedup), "--block-size", "16",
                                "--num-gpu-blocks-override", str(a.blocks_per_rank)], dyn_env)
        wait(f"{a.workers} Dynamo workers to register",
             lambda: len(os.listdir(os.path.join(store, "v1", "mdc"))) >= a.workers, procs)

        def frontend(name, mode):
            port = free_port()
            procs.start(name, [PY, "-m", "dynamo.frontend", "--discovery-backend", "file", "--event-plane", "nats",
                               "--request-plane", "tcp", "--router-mode", mode, "--http-host", "127.0.0.1",
                               "--http-port", str(port)], dyn_env)
            return f"http://127.0.0.1:{port}"

        sidecar = frontend("sidecar-direct", "direct")
        dynamo_kv = frontend("dynamo-kv", "kv")
        round_robin = frontend("dynamo-round-robin", "round-robin")
        for url in (sidecar, dynamo_kv, round_robin):
            wait(f"{url} to serve the model", lambda u=url: models_ready(u), procs)

        # kvgate's EPP: workers and model from Dynamo's store, events from NATS.
        ports = [free_port() for _ in range(3)]
        procs.start("kvgate-epp", [a.kvgate, "epp", "--host", "127.0.0.1", "--grpc-port", str(ports[0]),
                                   "--health-port", str(ports[1]), "--metrics-port", str(ports[2]),
                                   "--secure-serving=false", "--discovery-backend", "file",
                                   "--discovery-file-dir", store, "--dynamo-sidecar-url", sidecar,
                                   "--event-plane", "nats", "--nats-url", nats_url, "--tokenizer", MODEL],
                    {"RUST_LOG": "warn"})
        epp_http = f"http://127.0.0.1:{ports[2]}"
        wait("the EPP to read the workers' events",
             lambda: json.loads(get(epp_http + "/debug/index"))["event_plane_connected"] is True, procs)
        time.sleep(0.5)
        listen, admin = free_port(), free_port()
        cfg = open(os.path.join(ROOT, "deploy", "envoy", "gateway.yaml")).read()
        for k, v in {"LISTEN_PORT": listen, "ADMIN_PORT": admin, "EPP_HOST": "127.0.0.1", "EPP_PORT": ports[0],
                     "FAILURE_MODE_ALLOW": "false"}.items():
            cfg = cfg.replace("${" + k + "}", str(v))
        envoy_cfg = os.path.join(work, "envoy.yaml")
        open(envoy_cfg, "w").write(cfg)
        procs.start("envoy", [os.path.join(TOOLS, "bin", "envoy"), "-c", envoy_cfg, "--base-id",
                              str(listen), "--disable-hot-restart", "-l", "error", "--concurrency", "2"])
        wait("Envoy", lambda: get(f"http://127.0.0.1:{admin}/ready").strip() == "LIVE", procs)
        gateway = f"http://127.0.0.1:{listen}"

        # Two rounds, the second in reverse order, so that no router always meets fresh (or full)
        # caches; each (router, round) has text of its own.
        routers = [("kvgate", gateway), ("dynamo", dynamo_kv), ("round_robin", round_robin)]
        results = {name: {"requests": 0, "errors": 0, "prompt_tokens": 0, "cached_tokens": 0, "seconds": 0.0,
                          "latency": []} for name, _ in routers}
        for rnd in range(a.rounds):
            order = routers if rnd % 2 == 0 else list(reversed(routers))
            for name, url in order:
                convs = conversations(f"{name[:2]}{rnd}", a.conversations, a.turns, a.seed + rnd, 180, 40)
                t0 = time.time()
                s = asyncio.run(run_workload(url, convs, a.concurrency, a.max_tokens))
                procs.check()
                r = results[name]
                for k in ("requests", "errors", "prompt_tokens", "cached_tokens"):
                    r[k] += s[k]
                r["latency"] += s["ttft"]
                r["seconds"] = round(r["seconds"] + time.time() - t0, 1)
                hit = s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
                print(f"round {rnd} {name:12} hit {hit:.3f}  requests {s['requests']}  errors {s['errors']}",
                      file=sys.stderr)
        for name, r in results.items():
            lat = sorted(r.pop("latency")) or [0.0]
            r["latency_p90_s"] = round(lat[int(0.9 * (len(lat) - 1))], 3)
            r["hit"] = round(r["cached_tokens"] / r["prompt_tokens"], 4) if r["prompt_tokens"] else 0.0
        m = get(epp_http + "/metrics")
        out = {
            "kvgate_hit": results["kvgate"]["hit"],
            "dynamo_hit": results["dynamo"]["hit"],
            "round_robin_hit": results["round_robin"]["hit"],
            "errors": sum(r["errors"] for r in results.values()),
            "events_decoded": int(metric(m, "kvgate_kv_events_applied_total")),
            "events_failed": int(metric(m, "kvgate_kv_event_decode_errors_total")),
            "events_skipped": int(metric(m, "kvgate_kv_events_skipped_total")),
            "requests_per_router": a.conversations * a.turns * a.rounds,
            "workers": a.workers,
            "dp_size": a.dp_size,
            "blocks_per_rank": a.blocks_per_rank,
            "detail": results,
        }
        print(json.dumps(out))
    finally:
        procs.stop()
        if not a.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"interop: logs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
