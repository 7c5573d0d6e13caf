#!/usr/bin/env python3
"""Tables of the ordered-delivery benchmark (bench/ordering.sh), as in
docs/performance.md "Ordered delivery": ordered vs unordered side by side,
median [min-max] over the runs, and ratios of medians (same run).

    python3 bench/ordering.py bench/results/2026-12-06-ordering.jsonl [--include-disturbed]
"""
import sys
from collections import defaultdict

from points import fmt, load, med, ratio


def main_knobs(d):
    """The knobs of the main drain / relay points (other knobs: variants)."""
    p = d["params"]
    if d["scenario"] == "drain":
        return p.get("ack_batch") == 1000 and p.get("fetch_concurrency") == 1
    return True


def paired(rows, scen, keep):
    """Ordered / unordered throughput of each pair run back to back (an
    unordered point directly followed by the ordered one of the same
    parameters, both undisturbed): {key: [ratios]}."""
    out = defaultdict(list)
    prev = None
    for d in rows:
        if d["scenario"] != scen or not keep(d):
            prev = None
            continue
        p = d["params"]
        k = (p.get("keys"), p.get("hold"), p.get("poison"))
        if p.get("ordered") and prev is not None and prev[0] == k:
            out[k].append(d["throughput_msg_s"] / prev[1])
            prev = None
        elif not p.get("ordered"):
            prev = (k, d["throughput_msg_s"])
        else:
            prev = None
    return out


def spm(d, kw):
    return (d.get("statements_per_msg") or {}).get(kw, 0.0)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    inc = "--include-disturbed" in sys.argv
    rows = load(args[0], inc)
    every = load(args[0], True)  # for the pairs: a disturbed point breaks its pair
    undisturbed = lambda d: inc or not d.get("disturbed")
    P = lambda d: d["params"]

    # 1. drain / relay: unordered vs ordered per key count (no hold, no poison)
    for scen, title in (("drain", "Drain (w4, fetch 1000, ack 1000)"), ("relay", "Kafka relay (w90, fetch 1000, ack 100, linger 1 ms)")):
        g = defaultdict(lambda: defaultdict(list))
        for d in rows:
            p = P(d)
            if d["scenario"] != scen or p.get("hold", "none") != "none" or p.get("poison") or not main_knobs(d):
                continue
            if p.get("keys") is None:
                continue
            g[p["keys"]][bool(p.get("ordered"))].append(d)
        if not g:
            continue
        print(f"\n### {title}\n")
        pairs = paired(every, scen, lambda d: undisturbed(d) and main_knobs(d))
        print("| keys | unordered msg/s | ordered msg/s | ordered / unordered (medians) | same-invocation pairs | round trips/msg u / o | claims (with)/msg u / o | PG cores u / o | n |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in sorted(g):
            u, o = g[k][False], g[k][True]
            tu = [d["throughput_msg_s"] for d in u]
            to = [d["throughput_msg_s"] for d in o]
            rt = lambda ds: med([d.get("round_trips_per_msg") or 0 for d in ds])
            w = lambda ds: med([spm(d, "with") for d in ds])
            pc = lambda ds: med([d["cpu"].get("postgres_cores", 0) for d in ds])
            f4 = lambda v: "–" if v is None else f"{v:.4f}"
            f2 = lambda v: "–" if v is None else f"{v:.2f}"
            pr = pairs.get((k, "none", False), []) + pairs.get((k, None, None), [])
            print(f"| {k:,} | {fmt(tu)} | {fmt(to)} | **{ratio(to, tu)}** | {fmt(pr, 2)} | {f4(rt(u))} / {f4(rt(o))} | {f4(w(u))} / {f4(w(o))} | {f2(pc(u))} / {f2(pc(o))} | {len(tu)}+{len(to)} |")

    # 1b. drain variants (other ack batch / claims in flight)
    g = defaultdict(lambda: defaultdict(list))
    for d in rows:
        p = P(d)
        if d["scenario"] != "drain" or main_knobs(d) or p.get("hold", "none") != "none" or p.get("poison"):
            continue
        g[(p["keys"], p["ack_batch"], p["fetch_concurrency"])][bool(p.get("ordered"))].append(d["throughput_msg_s"])
    if g:
        print("\n### Drain variants (w4, fetch 1000)\n")
        print("| keys | ack batch | claims in flight | unordered msg/s | ordered msg/s | ordered / unordered | n |")
        print("|---|---|---|---|---|---|---|")
        for k in sorted(g):
            u, o = g[k][False], g[k][True]
            print(f"| {k[0]:,} | {k[1]} | {k[2]} | {fmt(u)} | {fmt(o)} | **{ratio(o, u)}** | {len(u)}+{len(o)} |")

    # 2. latency
    g = defaultdict(lambda: defaultdict(list))
    for d in rows:
        if d["scenario"] not in ("latency", "latency-kafka"):
            continue
        g[d["scenario"]][bool(P(d).get("ordered"))].append(d)
    if g:
        print("\n### Idle latency (1,000 single publishes 20 ms apart, default subscriber)\n")
        print("| path | unordered p50 | unordered p99 | ordered (1,000 keys) p50 | ordered p99 | n |")
        print("|---|---|---|---|---|---|")
        for s in sorted(g):
            u, o = g[s][False], g[s][True]
            q = lambda ds, k: [d["latency_ms"][k] for d in ds if d.get("latency_ms")]
            what = "COMMIT → handler" if s == "latency" else "COMMIT → Kafka ack (linger 5 ms)"
            print(f"| {what} | {fmt(q(u,'p50'),2)} ms | {fmt(q(u,'p99'),2)} ms | {fmt(q(o,'p50'),2)} ms | {fmt(q(o,'p99'),2)} ms | {len(u)}+{len(o)} |")

    # 3. produce
    g = defaultdict(lambda: defaultdict(list))
    for d in rows:
        if d["scenario"] != "produce" or "keys" not in P(d):
            continue
        p = P(d)
        g[(p["mode"], p["rows_per_tx"], p["concurrency"])][(p["keys"] > 0, p["key_index"])].append(d["throughput_msg_s"])
    if g:
        print("\n### Insert overhead (produce)\n")
        print("| mode | keyless, no key index | keyless (index kept: today's table) | keyed (1,000 keys), index kept | index cost (keyless: kept / dropped) | key cost (keyed / keyless, index kept) | keyed, no index |")
        print("|---|---|---|---|---|---|---|")
        for m in sorted(g):
            v = g[m]
            name = f"{m[0]} {m[1]} row(s)/tx, {m[2]} producer(s)"
            print(f"| {name} | {fmt(v[(False, False)])} | {fmt(v[(False, True)])} | {fmt(v[(True, True)])} | {ratio(v[(False, True)], v[(False, False)])} | {ratio(v[(True, True)], v[(False, True)])} | {fmt(v[(True, False)])} |")

    # 4. long transaction
    g = defaultdict(lambda: defaultdict(list))
    for d in rows:
        p = P(d)
        if d["scenario"] != "drain" or p.get("keys") != 1000 or p.get("poison") or "hold" not in p or not main_knobs(d):
            continue
        g[p["hold"]][bool(p.get("ordered"))].append(d)
    if len(g) > 1:
        print("\n### A long transaction in another session (1,000 keys)\n")
        print("| other session | unordered msg/s | vs none | ordered msg/s | vs none | xmin fence: rows visible / rows | n |")
        print("|---|---|---|---|---|---|---|")
        base = [d["throughput_msg_s"] for d in g["none"][True]]
        ubase = [d["throughput_msg_s"] for d in g["none"][False]]
        for h in ("none", "snapshot", "xid"):
            if h not in g:
                continue
            u = [d["throughput_msg_s"] for d in g[h][False]]
            o = [d["throughput_msg_s"] for d in g[h][True]]
            fences = {f"{d['xmin_fence']['visible_rows']:,} / {d['xmin_fence']['rows']:,}" for d in g[h][True] + g[h][False] if d.get("xmin_fence")}
            print(f"| {h} | {fmt(u)} | {ratio(u, ubase)} | {fmt(o)} | **{ratio(o, base)}** | {', '.join(sorted(fences)) or '–'} | {len(u)}+{len(o)} |")

    # 5. poison
    g = defaultdict(list)
    for d in rows:
        p = P(d)
        if d["scenario"] != "drain" or not p.get("ordered") or p.get("keys") != 1000 or p.get("hold", "none") != "none" or not main_knobs(d):
            continue
        g[bool(p.get("poison"))].append(d)
    if g.get(True):
        print("\n### A poisoned key (ordered, 1,000 keys, Block)\n")
        print("| key k0 | msg/s (the other keys' rows) | ratio to no poison | rows left | n |")
        print("|---|---|---|---|---|")
        base = [d["throughput_msg_s"] for d in g[False]]
        for pz in (False, True):
            t = [d["throughput_msg_s"] for d in g[pz]]
            left = sorted({d["rows_left"] for d in g[pz]})
            print(f"| {'always fails' if pz else 'healthy'} | {fmt(t)} | **{ratio(t, base)}** | {', '.join(map(str, left))} | {len(t)} |")


if __name__ == "__main__":
    main()
