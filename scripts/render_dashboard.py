#!/usr/bin/env python3
"""Draws the Grafana dashboard deploy/grafana/kvgate.json from a Prometheus, without Grafana.

    .tools/venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --out docs/img/dashboard.png --minutes 15

Each panel's queries run through Prometheus's /api/v1/query_range over the last N minutes (a
step of about 5 s), and the panels are drawn in a grid with matplotlib (Agg): the panel's title,
one line per series, labelled by the target's legendFormat with {{label}} substituted. A panel
whose queries return nothing is drawn empty with a "no data" note. The last stdout line is one JSON
object: {"panels": n, "queries": q, "queries_with_data": k} (a query has data when one of its
series has a finite sample). Queries Prometheus rejects are reported on stderr and count as having
no data; the exit status is 0 then too. It is 2 when Prometheus cannot be reached at all.
matplotlib is installed into .tools/venv by scripts/setup.sh.
"""

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prometheus answers at most 11,000 points per series.
MAX_POINTS = 10_000
UNIT_LABELS = {"reqps": "req/s", "ops": "ops/s", "bytes": "bytes"}
LEGEND_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class Unreachable(Exception):
    pass


def get_json(url, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        # Prometheus explains a bad query in a JSON body with status 400/422.
        try:
            body = json.load(e)
        except ValueError:
            body = {"status": "error", "error": f"HTTP {e.code}"}
        return body
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(f"{url}: {getattr(e, 'reason', e)}") from e


def query_range(base, expr, start, end, step, timeout):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    body = get_json(f"{base}/api/v1/query_range?{params}", timeout)
    if body.get("status") != "success":
        raise ValueError(body.get("error") or json.dumps(body)[:200])
    if body["data"].get("resultType") != "matrix":
        raise ValueError(f"result type {body['data'].get('resultType')}, not a matrix")
    return body["data"]["result"]


def legend(fmt, metric, expr):
    if fmt:
        return LEGEND_VAR.sub(lambda m: metric.get(m.group(1), ""), fmt)
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    name = metric.get("__name__", "")
    return f"{name}{{{labels}}}" if labels or name else expr


def finite(x):
    return not (math.isnan(x) or math.isinf(x))


def format_axis(ax, unit):
    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    elif unit == "percent":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=100.0))
    elif unit == "s":
        def seconds(v, _):
            a = abs(v)
            if a == 0:
                return "0"
            if a < 1e-3:
                return f"{v * 1e6:g} µs"
            if a < 1:
                return f"{v * 1e3:g} ms"
            return f"{v:g} s"

        ax.yaxis.set_major_formatter(FuncFormatter(seconds))
    elif unit in UNIT_LABELS:
        ax.set_ylabel(UNIT_LABELS[unit], fontsize=7)
    elif unit not in ("", "short", "none"):
        ax.set_ylabel(unit, fontsize=7)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--minutes", type=float, default=15, help="time range: the last N minutes")
    ap.add_argument("--dashboard", default=os.path.join(ROOT, "deploy/grafana/kvgate.json"))
    ap.add_argument("--step", type=float, default=5, help="seconds between points (raised to stay "
                    f"under {MAX_POINTS} points)")
    ap.add_argument("--timeout", type=float, default=30, help="seconds per query")
    args = ap.parse_args()

    with open(args.dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    base = args.prometheus.rstrip("/")
    end = time.time()
    start = end - args.minutes * 60
    step = max(args.step, math.ceil((end - start) / MAX_POINTS))

    try:
        get_json(f"{base}/api/v1/status/buildinfo", args.timeout)
    except Unreachable as e:
        print(f"render_dashboard: Prometheus is not reachable: {e}", file=sys.stderr)
        return 2

    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    panels.sort(key=lambda p: (p.get("gridPos", {}).get("y", 0), p.get("gridPos", {}).get("x", 0)))
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 3.4 * rows), squeeze=False)
    when = dt.datetime.fromtimestamp(end).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    fig.suptitle(f"{dash.get('title', 'dashboard')}: last {args.minutes:g} min, to {when}",
                 fontsize=13)

    n_queries = 0
    with_data = 0
    x_range = (dt.datetime.fromtimestamp(start), dt.datetime.fromtimestamp(end))
    for ax, panel in zip(axes.flat, panels):
        title = panel.get("title", "")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        lines = 0
        top = 0.0
        notes = []
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr or target.get("hide"):
                continue
            n_queries += 1
            try:
                result = query_range(base, expr, start, end, step, args.timeout)
            except (ValueError, Unreachable) as e:
                print(f"render_dashboard: {title}: {expr}: {e}", file=sys.stderr)
                notes.append(f"query error ({target.get('refId', '?')})")
                continue
            has_data = False
            for series in result:
                points = [(float(t), float(v)) for t, v in series.get("values", [])]
                if not any(finite(v) for _, v in points):
                    continue
                has_data = True
                xs = [dt.datetime.fromtimestamp(t) for t, _ in points]
                ys = [v if finite(v) else float("nan") for _, v in points]
                top = max([top] + [v for v in ys if finite(v)])
                name = legend(target.get("legendFormat", ""), series.get("metric", {}), expr)
                ax.plot(xs, ys, linewidth=1.2, label=name)
                lines += 1
            with_data += has_data
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlim(*x_range)
        clock = "%H:%M" if args.minutes > 10 else "%H:%M:%S"
        ax.xaxis.set_major_formatter(mdates.DateFormatter(clock))
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if lines:
            format_axis(ax, unit)
            # From 0 (or below, for negative values), with room above the highest point, so that
            # a flat line is not hidden on the frame.
            bottom = min(0, ax.get_ylim()[0])
            ax.set_ylim(bottom, top * 1.15 if top > 0 else ax.get_ylim()[1])
            ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
        else:
            ax.set_yticks([])
            notes.insert(0, "no data")
        if notes:
            ax.text(0.5, 0.5, "\n".join(dict.fromkeys(notes)), transform=ax.transAxes,
                    ha="center", va="center", fontsize=11, color="0.45")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)

    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(json.dumps({"panels": len(panels), "queries": n_queries, "queries_with_data": with_data}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
