#!/usr/bin/env python3
"""Summarize outbox-bench / py_bench JSON lines: one row per point (implementation,
scenario, parameters) with the median [min-max] over its repeats.

    python3 bench/summarize.py results.jsonl [more.jsonl ...] [--markdown] [--all]

Disturbed runs (a compile or another process busy during the run; field
"disturbed") and failed runs are left out unless --all. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

# Parameters that identify a point (others, like payload_bytes, are shown once).
KEY_PARAMS = [
    "bus",
    "in_flight",
    "mode",
    "rows_per_tx",
    "concurrency",
    "backlog",
    "workers",
    "fetch_batch_size",
    "ack_batch",
    "linger_ms",
    "rate",
    "fetch_concurrency",
    "durable_acks",
    "listen",
]


def load(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print(f"summarize: {p}:{n}: {e}", file=sys.stderr)
    return out


def point_key(r: dict[str, Any]) -> tuple[str, str, str]:
    params = r.get("params") or {}
    parts = [f"{k}={params[k]}" for k in KEY_PARAMS if params.get(k) is not None]
    return (r.get("impl", "?"), r.get("scenario", "?"), " ".join(parts))


def med(values: list[float]) -> tuple[float, float, float] | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return statistics.median(v), min(v), max(v)


def fmt(t: tuple[float, float, float] | None, digits: int = 0) -> str:
    if t is None:
        return "-"
    m, lo, hi = t
    f = f"{{:,.{digits}f}}"
    if len(set([round(m, digits), round(lo, digits), round(hi, digits)])) == 1:
        return f.format(m)
    return f"{f.format(m)} [{f.format(lo)}–{f.format(hi)}]"


def g(r: dict[str, Any], *path: str) -> Any:
    cur: Any = r
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def summarize(rows: list[dict[str, Any]], include_all: bool) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not include_all and (r.get("error") or r.get("disturbed")):
            continue
        groups.setdefault(point_key(r), []).append(r)
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: kv[0]):
        lat_key = "latency_ms"
        out.append(
            {
                "impl": key[0],
                "scenario": key[1],
                "point": key[2],
                "n": len(rs),
                "msgs": rs[0].get("messages"),
                "throughput": med([r.get("throughput_msg_s") for r in rs]),
                "p50": med([g(r, lat_key, "p50") for r in rs]),
                "p99": med([g(r, lat_key, "p99") for r in rs]),
                "rt": med([r.get("round_trips_per_msg") for r in rs]),
                "wal": med([r.get("wal_bytes_per_msg") for r in rs]),
                "rss": med([r.get("peak_rss_mib") for r in rs]),
                "pg_cores": med([g(r, "cpu", "postgres_cores") for r in rs]),
                "bench_cores": med([g(r, "cpu", "bench_cores") for r in rs]),
                "stmts": rs[0].get("statements_per_msg"),
                "rows_left": sorted({r.get("rows_left") for r in rs}, key=str),
                "load": med([(g(r, "load", "loadavg_start") or [None])[0] for r in rs]),
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--all", action="store_true", help="include disturbed and failed runs")
    a = p.parse_args()
    rows = load(a.files)
    s = summarize(rows, a.all)
    cols = [
        ("impl", lambda x: x["impl"]),
        ("scenario", lambda x: x["scenario"]),
        ("point", lambda x: x["point"]),
        ("n", lambda x: str(x["n"])),
        ("msgs", lambda x: f"{x['msgs']:,}" if x["msgs"] else "-"),
        ("msg/s", lambda x: fmt(x["throughput"])),
        ("p50 ms", lambda x: fmt(x["p50"], 2)),
        ("p99 ms", lambda x: fmt(x["p99"], 2)),
        ("rt/msg", lambda x: fmt(x["rt"], 4)),
        ("WAL B/msg", lambda x: fmt(x["wal"])),
        ("pg cores", lambda x: fmt(x["pg_cores"], 2)),
        ("bench cores", lambda x: fmt(x["bench_cores"], 2)),
        ("peak RSS MiB", lambda x: fmt(x["rss"], 1)),
        ("rows left", lambda x: ",".join(str(v) for v in x["rows_left"])),
        ("load", lambda x: fmt(x["load"], 2)),
    ]
    table = [[c[1](x) for c in cols] for x in s]
    head = [c[0] for c in cols]
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in table:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    skipped = sum(1 for r in rows if r.get("error") or r.get("disturbed"))
    if skipped and not a.all:
        print(f"({skipped} disturbed or failed run(s) left out; --all shows them)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
