#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver: the official opentelemetry-proto TraceService on grpcio.

    .tools/venv/bin/python scripts/otlp_receiver.py --port PORT --out FILE

PORT 0 picks a free port. The first line on stdout is `listening on 127.0.0.1:<port>`. For every
exported span one JSON line is appended to FILE:

    {"service": ..., "name": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex or "",
     "kind": int, "attributes": {key: string | int | double | bool}}

FILE is flushed after each Export call. SIGTERM (or SIGINT) stops the server cleanly.
Installed by scripts/setup.sh (opentelemetry-proto, grpcio in .tools/venv).
"""

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def any_value(v):
    """An AnyValue as JSON: the scalar kinds as themselves, arrays and maps recursively."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for rs in request.resource_spans:
            service = attributes(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    record = {
                        "service": service,
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "kind": int(span.kind),
                        "attributes": attributes(span.attributes),
                    }
                    lines.append(json.dumps(record, separators=(",", ":")) + "\n")
        with self.lock:
            self.out.writelines(lines)
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True, help="port on 127.0.0.1; 0 picks a free one")
    ap.add_argument("--out", required=True, help="JSON-lines file the spans are appended to")
    args = ap.parse_args()

    out = open(args.out, "a", encoding="utf-8")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    try:
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        print(f"otlp_receiver: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        sys.exit(1)
    server.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on 127.0.0.1:{port}", flush=True)
    # Event.wait with a timeout, so the main thread runs the signal handler promptly.
    while not stop.wait(0.5):
        pass
    # Let in-flight Export calls finish (and their lines be flushed), then close the file.
    server.stop(grace=2).wait()
    out.close()


if __name__ == "__main__":
    main()
