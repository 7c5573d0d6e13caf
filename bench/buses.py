#!/usr/bin/env python3
"""The bus table of docs/performance.md from outbox-bench JSON lines: per bus,
the relay's throughput next to the bus's own plain-client ceiling measured in
the same run (median of the ceiling points), their ratio, and idle
commit -> confirm latency.

    python3 bench/buses.py results.jsonl [--markdown]

Disturbed and failed points are left out. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

TARGET_RATIO = 0.60
TARGET_P99_MS = 15.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    rows = []
    for p in a.paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    if not r.get("disturbed") and "error" not in r:
                        rows.append(r)
    by_bus: dict[str, dict[str, list]] = {}
    for r in rows:
        bus = (r.get("params") or {}).get("bus")
        if not bus or bus == "kafka":  # Kafka has its own table
            continue
        s = r.get("scenario")
        kind = {"ceiling": "ceiling", "relay": "relay", "latency-bus": "latency"}.get(s)
        if kind:
            by_bus.setdefault(bus, {}).setdefault(kind, []).append(r)
    memory = [r["throughput_msg_s"] for r in by_bus.pop("memory", {}).get("relay", [])]
    mem = statistics.median(memory) if memory else None
    if not by_bus:
        print("buses.py: no bus points found", file=sys.stderr)
        return 1
    head = ["bus", "ceiling msg/s", "relay msg/s", "relay/ceiling", "relay/memory relay", "ceiling confirm p99 ms",
            "commit->confirm p50 ms", "p99 ms", "targets (>= 0.60, p99 < 15 ms)"]
    out = []
    ok_all = True
    for bus in sorted(by_bus):
        d = by_bus[bus]
        ceil = [r["throughput_msg_s"] for r in d.get("ceiling", [])]
        relay = [r["throughput_msg_s"] for r in d.get("relay", [])]
        lat = d.get("latency", [])
        c = statistics.median(ceil) if ceil else None
        rl = statistics.median(relay) if relay else None
        ratio = rl / c if c and rl else None
        cp99 = statistics.median([r["latency_ms"]["p99"] for r in d.get("ceiling", [])]) if ceil else None
        p50 = statistics.median([r["latency_ms"]["p50"] for r in lat]) if lat else None
        p99 = statistics.median([r["latency_ms"]["p99"] for r in lat]) if lat else None
        ok = ratio is not None and ratio >= TARGET_RATIO and p99 is not None and p99 < TARGET_P99_MS
        ok_all &= ok
        f = lambda v, n=1: "-" if v is None else f"{v:,.{n}f}"
        out.append([bus, f(c, 0), f(rl, 0), f(ratio, 2), f(rl / mem if rl and mem else None, 2), f(cp99, 2), f(p50, 2), f(p99, 2),
                    "met" if ok else "NOT met"])
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for o in out:
            print("| " + " | ".join(o) + " |")
    else:
        w = [max(len(h), *(len(o[i]) for o in out)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
        for o in out:
            print("  ".join(v.ljust(w[i]) for i, v in enumerate(o)))
    if mem is not None:
        print(f"\nmemory relay (the outbox side's ceiling for the same route, a transport that confirms at once): {mem:,.0f} msg/s")
    return 0 if ok_all else 2


if __name__ == "__main__":
    sys.exit(main())
