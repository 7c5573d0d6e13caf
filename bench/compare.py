#!/usr/bin/env python3
"""Side by side: faststream-outbox 0.19 (bench/python/py_bench.py) and outbox
(outbox-bench) on the SAME database server with the same workloads, in one run.
Called by scripts/bench-compare.sh, which starts the private PostgreSQL, builds the
release binary and the Python venv; see docs/performance.md.

    python3 bench/compare.py --rust target/release/outbox-bench --python .cache/py-venv/bin/python \
        [--database-url URL] [--repeats 3] [--out bench/results/compare.jsonl] [--quick]

For every comparison, the Rust and Python runs of one repeat are interleaved
(alternating which goes first), each after waiting for a quiet machine (no rustc,
< 0.35 cores busy over 2 s), and re-run (up to twice) when a compile or another
process disturbed it. Prints one markdown table: each side's best configuration
(median [min-max] over the repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def rustc_count() -> int:
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/comm") as f:
                    n += f.read().strip() == "rustc"
            except OSError:
                pass
    return n


def busy_cores(over: float = 2.0) -> float:
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)

    b0, _ = snap()
    t0 = time.monotonic()
    time.sleep(over)
    b1, _ = snap()
    return (b1 - b0) / 100.0 / (time.monotonic() - t0)


def wait_quiet(max_wait: float, max_busy: float) -> tuple[int, float]:
    deadline = time.monotonic() + max_wait
    warned = False
    while True:
        n = rustc_count()
        busy = busy_cores() if n == 0 else float("nan")
        if (n == 0 and busy < max_busy) or time.monotonic() > deadline:
            return n, 0.0 if busy != busy else busy
        if not warned:
            print(f"compare: machine busy ({n} rustc, {busy:.2f} cores); waiting", file=sys.stderr)
            warned = True
        time.sleep(3)


@dataclass
class Side:
    label: str
    argv: list[str]


@dataclass
class Item:
    name: str
    what: str
    metric: str  # "throughput" (higher is better) or "p50"/"p99" (lower is better)
    rust: list[Side]
    python: list[Side]
    # faststream-outbox 0.19's best figure for this work in the research run on this
    # machine type (upstream harness / e2e script, ../shared/research/perf-baseline.md):
    # a second, independent reference, so that the ratio never rests on our Python
    # harness alone.
    anchor: float | None = None
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def run_one(argv: list[str], env: dict[str, str], timeout: float) -> tuple[dict[str, Any] | None, int, str]:
    max_rustc = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            max_rustc[0] = max(max_rustc[0], rustc_count())
            stop.wait(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        stop.set()
        return None, max_rustc[0], f"timed out after {timeout:.0f} s"
    finally:
        stop.set()
        t.join()
    docs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not docs:
        return (docs[-1] if docs else None), max_rustc[0], (p.stderr.strip().splitlines() or ["?"])[-1]
    return docs[-1], max_rustc[0], ""


def measure(side: Side, env: dict[str, str], args: argparse.Namespace, out: Any) -> dict[str, Any] | None:
    for attempt in range(3):
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet, args.quiet_cores)
        doc, rustc, err = run_one(side.argv, env, args.timeout)
        if doc is None or doc.get("error"):
            print(f"compare: {side.label}: FAILED: {err or (doc or {}).get('error')}", file=sys.stderr)
            return None
        other = (doc.get("cpu") or {}).get("other_cores") or 0.0
        disturbed = rustc > 0 or other > args.max_other_cores
        doc["disturbed"] = disturbed
        doc["attempt"] = attempt
        doc["compare_label"] = side.label
        out.write(json.dumps(doc) + "\n")
        out.flush()
        if not disturbed or attempt == 2:
            return doc
        print(
            f"compare: {side.label}: disturbed ({rustc} rustc, {other:.2f} other cores); re-running",
            file=sys.stderr,
        )
    return None


def value(doc: dict[str, Any], metric: str) -> float | None:
    if metric == "throughput":
        return doc.get("throughput_msg_s")
    return (doc.get("latency_ms") or {}).get(metric)


def best(item: Item, impl: str) -> tuple[str, tuple[float, float, float]] | None:
    """The configuration with the best median, and its median [min, max]."""
    cands = []
    for label, docs in item.results.get(impl, {}).items():
        vals = [v for v in (value(d, item.metric) for d in docs) if v is not None]
        if vals:
            cands.append((label, (statistics.median(vals), min(vals), max(vals))))
    if not cands:
        return None
    higher = item.metric == "throughput"
    return sorted(cands, key=lambda c: c[1][0], reverse=higher)[0]


def fmt(t: tuple[float, float, float], digits: int) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(t[0])} [{f.format(t[1])}–{f.format(t[2])}]"


def items(a: argparse.Namespace) -> list[Item]:
    R = [a.rust, "--database-url", a.database_url, "--wait-quiet-secs", "0", "--retries", "0"]
    P = [a.python, os.path.join(HERE, "python", "py_bench.py"), "--database-url", a.database_url]
    per_row = 5_000 if a.quick else 20_000
    batched = 10_000 if a.quick else 50_000
    single = 2_000 if a.quick else 5_000
    batch = 20_000 if a.quick else 100_000
    samples = 200 if a.quick else 1_000
    out = [
        Item(
            "drain, per-row acks",
            f"{per_row:,}-row backlog, no-op handler; Python tfbs=1, ours ack_batch=1; best of w1/w4 × fetch 100",
            "throughput",
            rust=[
                Side(f"w{w}/b100/ack1", R + ["drain", "--backlog", str(per_row), "--workers", str(w),
                                              "--fetch-batch-size", "100", "--ack-batch", "1"])
                for w in (1, 4)
            ],
            python=[
                Side(f"w{w}/b100/tfbs1", P + ["drain", "--backlog", str(per_row), "--workers", str(w),
                                              "--fetch-batch-size", "100", "--tfbs", "1"])
                for w in (1, 4)
            ],
            anchor=2_593,
        ),
        Item(
            "drain, batched acks",
            f"{batched:,}-row backlog; Python tfbs=100 (w1/w4 × fetch 100, its best); ours ack_batch=1000 "
            "× fetch 1000 (w1/w4, and w4 with 2 claims in flight), Python's own w4/b100/ack100, and w4/b1000 "
            "with the transaction-held claim (--claim transaction)",
            "throughput",
            rust=[
                Side(f"w{w}/b1000/ack1000", R + ["drain", "--backlog", str(batched), "--workers", str(w),
                                                  "--fetch-batch-size", "1000", "--ack-batch", "1000"])
                for w in (1, 4)
            ]
            + [
                Side("w4/b1000/ack1000/fc2", R + ["drain", "--backlog", str(batched), "--workers", "4",
                                                  "--fetch-batch-size", "1000", "--ack-batch", "1000",
                                                  "--fetch-concurrency", "2"]),
                Side("w4/b100/ack100", R + ["drain", "--backlog", str(batched), "--workers", "4",
                                            "--fetch-batch-size", "100", "--ack-batch", "100"]),
                # The transaction-held claim (issue 16): rows locked in the
                # claim's transaction and deleted in it, no lease write.
                Side("w4/b1000/ack1000/transaction", R + ["drain", "--backlog", str(batched), "--workers", "4",
                                                          "--fetch-batch-size", "1000", "--ack-batch", "1000",
                                                          "--claim", "transaction"]),
            ],
            python=[
                Side(f"w{w}/b100/tfbs100", P + ["drain", "--backlog", str(batched), "--workers", str(w),
                                                 "--fetch-batch-size", "100", "--tfbs", "100"])
                for w in (1, 4)
            ],
            anchor=7_250,
        ),
        Item(
            "produce, single",
            f"{single:,} × (BEGIN; publish; COMMIT), one connection",
            "throughput",
            rust=[Side("single", R + ["produce", "--mode", "single", "--messages", str(single)])],
            python=[Side("single", P + ["produce", "--mode", "single", "--messages", str(single)])],
            # no anchor: the research timed 100 publishes per transaction, not one
        ),
        Item(
            "produce, batch 100",
            f"{batch:,} rows as (BEGIN; publish_batch(100); COMMIT), one connection",
            "throughput",
            rust=[Side("batch100", R + ["produce", "--mode", "batch", "--batch-size", "100",
                                        "--messages", str(batch)])],
            python=[Side("batch100", P + ["produce", "--mode", "batch", "--batch-size", "100",
                                          "--messages", str(batch)])],
            anchor=29_000,
        ),
        Item(
            "idle latency p50",
            f"{samples:,} single publishes 20 ms apart, default subscriber, LISTEN: COMMIT returned → handler",
            "p50",
            rust=[Side("defaults", R + ["latency", "--samples", str(samples)])],
            python=[Side("defaults", P + ["latency", "--samples", str(samples)])],
            anchor=2.57,
        ),
    ]
    # p99 of the same latency runs (no extra runs).
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rust", required=True)
    p.add_argument("--python", required=True)
    p.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5433/outbox_bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare.jsonl"))
    p.add_argument("--quick", action="store_true", help="smaller workloads (a smoke test)")
    p.add_argument("--wait-quiet", type=float, default=1200.0)
    p.add_argument("--quiet-cores", type=float, default=0.35)
    p.add_argument("--max-other-cores", type=float, default=0.35)
    p.add_argument("--timeout", type=float, default=900.0)
    a = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("BENCH_LOG", "error")
    todo = items(a)
    with open(a.out, "a", encoding="utf-8") as out:
        for item in todo:
            for r in range(a.repeats):
                pairs = [("rust", s) for s in item.rust] + [("python", s) for s in item.python]
                if r % 2:
                    pairs.reverse()
                for impl, side in pairs:
                    print(f"compare: {item.name}: {impl} {side.label} (repeat {r + 1}/{a.repeats})", file=sys.stderr)
                    doc = measure(side, env, a, out)
                    if doc is not None:
                        item.results.setdefault(impl, {}).setdefault(side.label, []).append(doc)
                        v = value(doc, item.metric)
                        print(f"compare:   -> {v}", file=sys.stderr)
    print(f"\nfaststream-outbox 0.19 (Python) vs outbox (Rust), same server ({a.database_url}), "
          f"median [min–max] of {a.repeats} repeats; raw results: {a.out}\n")
    print("| comparison | workload | faststream-outbox best config | faststream-outbox | outbox best config | outbox "
          "| ratio | research anchor (ratio) |")
    print("|---|---|---|---|---|---|---|---|")
    for item in todo:
        py, rs = best(item, "python"), best(item, "rust")
        digits = 0 if item.metric == "throughput" else 2
        unit = " msg/s" if item.metric == "throughput" else " ms"
        ratio = "-"
        if py and rs and py[1][0] and rs[1][0]:
            ratio = (
                f"{rs[1][0] / py[1][0]:.1f}× faster" if item.metric == "throughput"
                else f"{py[1][0] / rs[1][0]:.1f}× lower"
            )
        anchor = "-"
        if item.anchor and rs and rs[1][0]:
            r = rs[1][0] / item.anchor if item.metric == "throughput" else item.anchor / rs[1][0]
            anchor = f"{item.anchor:,.{digits}f}{unit} ({r:.1f}×)"
        print(
            f"| {item.name} | {item.what} | {py[0] if py else '-'} | {fmt(py[1], digits) + unit if py else '-'} "
            f"| {rs[0] if rs else '-'} | {fmt(rs[1], digits) + unit if rs else '-'} | {ratio} | {anchor} |"
        )
        if item.metric == "p50":
            item.metric = "p99"
            py, rs = best(item, "python"), best(item, "rust")
            if py and rs:
                print(
                    f"| idle latency p99 | same runs | {py[0]} | {fmt(py[1], 2)} ms | {rs[0]} | {fmt(rs[1], 2)} ms "
                    f"| {py[1][0] / rs[1][0]:.1f}× lower | 3.67 ms ({3.67 / rs[1][0]:.1f}×) |"
                )
    # statements per message of the best configurations
    print("\nPostgreSQL work per message (best configurations, first repeat): round trips, statements by kind, WAL")
    print("\n| comparison | impl | round trips/msg | statements/msg | WAL B/msg | PG CPU cores | client CPU cores |")
    print("|---|---|---|---|---|---|---|")
    for item in todo:
        item.metric = "p50" if item.name.startswith("idle") else item.metric
        for impl in ("python", "rust"):
            b = best(item, impl)
            if not b:
                continue
            d = item.results[impl][b[0]][0]
            st = ", ".join(f"{k} {v}" for k, v in (d.get("statements_per_msg") or {}).items())
            cpu = d.get("cpu") or {}
            print(
                f"| {item.name} | {impl} {b[0]} | {d.get('round_trips_per_msg')} | {st} | "
                f"{d.get('wal_bytes_per_msg')} | {cpu.get('postgres_cores')} | {cpu.get('bench_cores')} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
