#!/usr/bin/env python3
"""Tables of the claim-mode benchmark (bench/throughput.sh, issue 16): the
lease claim vs the transaction-held claim side by side, median [min-max] over
the undisturbed runs, ratios of medians (same run), and the issue's targets.

    python3 bench/throughput.py bench/results/<file>.jsonl [--include-disturbed] [--markdown-out F]

Also the Python side's measurement step for bench/throughput.sh (compare.py's
quiet-machine wait and disturbed re-runs around bench/python/py_bench.py):

    python3 bench/throughput.py --measure-python --python PY --database-url URL --out F -- drain ARGS...
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from points import fmt, load, med, ratio  # noqa: E402

MODES = ("lease", "transaction")


def one(xs, digits=0):
    m = med(xs)
    return "–" if m is None else f"{m:,.{digits}f}"


def mode(d):
    return (d.get("params") or {}).get("claim_mode")


def field(rows, name):
    return [r.get(name) for r in rows]


def lat(rows, key="latency_ms", p="p50"):
    return [(r.get(key) or {}).get(p) for r in rows]


def status(ok):
    if ok is None:
        return "–"
    return "**met**" if ok else "not met"


def tables(rows, lines, include_disturbed=False):
    p = lambda s="": lines.append(s)  # noqa: E731
    by = defaultdict(list)
    ceilings = []
    python = []
    relay_backlogs = sorted({(d.get("params") or {}).get("backlog") for d in rows
                             if d.get("scenario") == "relay" and d.get("impl") == "rust"} - {None})
    for d in rows:
        s, prm = d.get("scenario"), d.get("params") or {}
        if s == "ceiling" and prm.get("bus") == "kafka":
            ceilings.append(d)
        elif d.get("impl") == "python" and s == "drain":
            python.append(d)
        elif d.get("impl") == "rust" and prm.get("claim_mode_set"):
            if s == "drain":
                by[("drain", prm.get("fetch_batch_size"), mode(d))].append(d)
            elif s == "relay" and len(relay_backlogs) > 1 and prm.get("backlog") == relay_backlogs[-1]:
                by[("rss", mode(d))].append(d)
            elif s == "relay":
                by[("relay", mode(d))].append(d)
            elif s == "relay-steady":
                by[("steady", mode(d))].append(d)
            elif s in ("latency", "latency-kafka"):
                by[(s, mode(d))].append(d)

    def tp(k):
        return field(by[k], "throughput_msg_s")

    # -- drain ---------------------------------------------------------------
    def backlogs(rs):
        return "/".join(f"{b:,}" for b in sorted({(r.get("params") or {}).get("backlog") for r in rs} - {None})) or "–"

    drains = [d for k, v in by.items() if k[0] == "drain" for d in v]
    p(f"#### Batched drain ({backlogs(drains)} backlog, w4, fetch = ack batch), lease vs transaction, same run")
    p()
    p("| rows per claim / delete | lease msg/s | transaction msg/s | transaction / lease | WAL B/msg produce · drain · total (lease → transaction) | drain WAL without FPI (lease → transaction) | dead tuples/msg (lease → transaction) |")
    p("|---|---|---|---|---|---|---|")
    for b in (100, 1000):
        L, T = by[("drain", b, "lease")], by[("drain", b, "transaction")]
        if not L and not T:
            continue

        def wal(rs):
            return (f"{one(field(rs, 'wal_bytes_per_msg_produce'))} · {one(field(rs, 'wal_bytes_per_msg_drain'))} · "
                    f"{one(field(rs, 'wal_bytes_per_msg_total'))}")

        def nofpi(rs):
            return med([
                (r.get("wal_bytes_per_msg_drain") - r["wal_fpi_bytes_per_msg_window"])
                if r.get("wal_fpi_bytes_per_msg_window") is not None and r.get("wal_bytes_per_msg_drain") is not None
                else None
                for r in rs
            ])

        nl, nt = nofpi(L), nofpi(T)
        p(f"| {b} | {fmt(field(L, 'throughput_msg_s'))} | {fmt(field(T, 'throughput_msg_s'))} | "
          f"**{ratio(tp(('drain', b, 'transaction')), tp(('drain', b, 'lease')))}** | {wal(L)} → {wal(T)} | "
          f"{'–' if nl is None else f'{nl:,.0f}'} → {'–' if nt is None else f'{nt:,.0f}'} | "
          f"{one(field(L, 'dead_tuples_per_msg'), 2)} → {one(field(T, 'dead_tuples_per_msg'), 2)} |")
    p()
    t1000 = tp(("drain", 1000, "transaction"))
    l1000 = tp(("drain", 1000, "lease"))
    py = field(python, "throughput_msg_s")
    p("#### Side by side with faststream-outbox 0.19 (same server, same run)")
    p()
    p("| | msg/s | vs faststream-outbox |")
    p("|---|---|---|")
    p(f"| faststream-outbox 0.19, w4 / fetch 100 / tfbs 100, {backlogs(python)} backlog | {fmt(py)} | 1 |")
    for b in (100, 1000):
        for m in MODES:
            xs = tp(("drain", b, m))
            if xs:
                p(f"| outbox {m}, w4 / fetch {b} / ack {b}, {backlogs(by[('drain', b, m)])} backlog | {fmt(xs)} | "
                  f"{ratio(xs, py, 1)}× |")
    p()
    # -- relay ---------------------------------------------------------------
    relays = by[("relay", "lease")] + by[("relay", "transaction")]
    p(f"#### Relay to Kafka, the README's route (relay defaults, default producer settings), {backlogs(relays)} backlog")
    p()
    lin = sorted({(c.get("params") or {}).get("settings", {}).get("linger_ms") for c in ceilings} - {None})
    cfl = sorted({(c.get("params") or {}).get("in_flight") for c in ceilings} - {None})
    ceil = field(ceilings, "throughput_msg_s")
    p(f"Broker ceiling (plain producer, same librdkafka settings, linger {lin} ms, {cfl} in flight): {fmt(ceil)} msg/s")
    p()
    p("| mode | msg/s | / ceiling | WAL B/msg produce · drain · total | total without FPI | dead tuples/msg | peak RSS MiB |")
    p("|---|---|---|---|---|---|---|")
    for m in MODES:
        R = by[("relay", m)]
        if not R:
            continue
        p(f"| {m} | {fmt(field(R, 'throughput_msg_s'))} | {ratio(field(R, 'throughput_msg_s'), ceil)} | "
          f"{one(field(R, 'wal_bytes_per_msg_produce'))} · {one(field(R, 'wal_bytes_per_msg_drain'))} · "
          f"{one(field(R, 'wal_bytes_per_msg_total'))} | {one(field(R, 'wal_bytes_per_msg_total_without_fpi'))} | "
          f"{one(field(R, 'dead_tuples_per_msg'), 2)} | {one(field(R, 'peak_rss_mib'), 1)} |")
    p(f"| transaction / lease | {ratio(tp(('relay', 'transaction')), tp(('relay', 'lease')))} | | | | | |")
    p()
    S = {m: by[("steady", m)] for m in MODES}
    if any(S.values()):
        rate = sorted({(d.get("params") or {}).get("rate") for v in S.values() for d in v} - {None})
        p(f"#### Steady relay to Kafka (producer at {'/'.join(f'{r:,}' for r in rate)} msg/s in the window; "
          "WAL includes its INSERTs)")
        p()
        p("| mode | relayed msg/s in window | WAL B/msg (total) | of which FPI | dead tuples/msg | created → Kafka ack p50 / p99 ms |")
        p("|---|---|---|---|---|---|")
        for m in MODES:
            R = S[m]
            if R:
                p(f"| {m} | {fmt(field(R, 'relay_rate_in_window_msg_s'))} | {fmt(field(R, 'wal_bytes_per_msg_total'))} | "
                  f"{one(field(R, 'wal_fpi_bytes_per_msg_window'))} | {one(field(R, 'dead_tuples_per_msg'), 2)} | "
                  f"{one(lat(R), 2)} / {one(lat(R, p='p99'), 2)} |")
        p()
    # -- latency -------------------------------------------------------------
    lats = [d for k, v in by.items() if k[0].startswith("latency") for d in v]
    n = sorted({(d.get("params") or {}).get("samples") for d in lats} - {None})
    p(f"#### Idle latency ({'/'.join(map(str, n)) or '–'} single publishes 20 ms apart, default subscriber / route)")
    p()
    p("| mode | commit → handler p50 / p99 ms | commit → Kafka ack p50 / p99 ms |")
    p("|---|---|---|")
    for m in MODES:
        H, K = by[("latency", m)], by[("latency-kafka", m)]
        if H or K:
            p(f"| {m} | {fmt(lat(H), 2)} / {fmt(lat(H, p='p99'), 2)} | {fmt(lat(K), 2)} / {fmt(lat(K, p='p99'), 2)} |")
    p()
    RSS = {m: by[("rss", m)] for m in MODES}
    if any(RSS.values()):
        p(f"#### Relay with a {backlogs(RSS['lease'] + RSS['transaction'])}-row backlog (README route)")
        p()
        p("| mode | msg/s | peak RSS MiB | first / last tenth msg/s |")
        p("|---|---|---|---|")
        for m in MODES:
            R = RSS[m]
            if R:
                sl = (R[0].get("slices") or [])
                edge = f"{sl[0]['msg_s']:,.0f} / {sl[-1]['msg_s']:,.0f}" if sl else "–"
                p(f"| {m} | {fmt(field(R, 'throughput_msg_s'))} | {fmt(field(R, 'peak_rss_mib'), 1)} | {edge} |")
        p()
    # -- targets -------------------------------------------------------------
    p("#### Issue 16 targets (medians of this run)")
    p()
    p("| target | measured | status |")
    p("|---|---|---|")
    mt, ml, mp = med(t1000), med(l1000), med(py)
    if mt and ml:
        p(f"| batched drain ≥ 2.0× lease (fetch/ack 1000) | {mt / ml:.2f}× ({mt:,.0f} vs {ml:,.0f}) | {status(mt >= 2 * ml)} |")
        p(f"| batched drain ≥ 85,000 msg/s here | {mt:,.0f} | {status(mt >= 85_000)} |")
    if mt and mp:
        p(f"| batched drain ≥ 20× faststream-outbox 0.19 | {mt / mp:.1f}× | {status(mt >= 20 * mp)} |")
    rt, mc = med(tp(("relay", "transaction"))), med(ceil)
    if rt:
        bar = min(60_000, 0.8 * mc) if mc else 60_000
        p(f"| relay ≥ min(60,000, 0.8 × ceiling {'–' if not mc else f'{mc:,.0f}'}) = {bar:,.0f} msg/s, default settings | "
          f"{rt:,.0f}{'' if not mc else f' ({rt / mc:.2f} of the ceiling)'} | {status(rt >= bar)} |")
    wt = med(field(S.get("transaction", []), "wal_bytes_per_msg_total"))
    wb = med(field(by[("relay", "transaction")], "wal_bytes_per_msg_total"))
    wbn = med(field(by[("relay", "transaction")], "wal_bytes_per_msg_total_without_fpi"))
    if wt is not None or wb is not None:
        parts = []
        if wt is not None:
            parts.append(f"steady {wt:,.0f}")
        if wb is not None:
            parts.append(f"backlog after a CHECKPOINT {wb:,.0f} ({'–' if wbn is None else f'{wbn:,.0f}'} without FPI)")
        best = wt if wt is not None else wb
        p(f"| ≤ 600 B WAL per relayed message incl. the INSERT (transaction) | {'; '.join(parts)} | "
          f"{status(best <= 600)} |")
    H, K = by[("latency", "transaction")], by[("latency-kafka", "transaction")]
    hp50, hp99, kp99 = med(lat(H)), med(lat(H, p="p99")), med(lat(K, p="p99"))
    if hp50 is not None:
        p(f"| idle commit → handler p50 ≤ 1 ms, p99 ≤ 3 ms (transaction) | {hp50:.2f} / {hp99:.2f} ms | {status(hp50 <= 1 and hp99 <= 3)} |")
    if kp99 is not None:
        p(f"| idle commit → Kafka p99 ≤ 10 ms (relay default: transaction) | {kp99:.2f} ms | {status(kp99 <= 10)} |")
    rs = med(field(RSS.get("transaction", []), "peak_rss_mib"))
    if rs is not None:
        p(f"| RSS with a {backlogs(RSS['transaction'])}-row backlog ≤ 50 MB (relay default) | {rs:.1f} MiB | "
          f"{status(rs * 1.048576 <= 50)} |")
    p()
    p(f"({len(rows)} points{'' if not include_disturbed else ', disturbed ones included'}; WAL: produce = the backlog's INSERTs, drain = the measured window after its "
      "CHECKPOINT incl. full-page images (FPI), see each point's wal_scope)")


def measure_python(a, argv):
    import compare  # bench/compare.py

    side = compare.Side("python/" + "/".join(argv), [a.python, os.path.join(HERE, "python", "py_bench.py"),
                                                      "--database-url", a.database_url] + argv)
    env = dict(os.environ)
    env.setdefault("BENCH_LOG", "error")
    args = argparse.Namespace(wait_quiet=a.wait_quiet, quiet_cores=0.35, max_other_cores=0.35, timeout=900.0)
    with open(a.out, "a", encoding="utf-8") as out:
        doc = compare.measure(side, env, args, out)
    if doc is None:
        return 1
    print(f"throughput.py: faststream-outbox {' '.join(argv)}: {doc.get('throughput_msg_s')} msg/s", file=sys.stderr)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--include-disturbed", action="store_true")
    ap.add_argument("--markdown-out", help="also write the tables to this file")
    ap.add_argument("--measure-python", action="store_true")
    ap.add_argument("--python")
    ap.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5433/outbox_bench")
    ap.add_argument("--out")
    ap.add_argument("--wait-quiet", type=float, default=1200.0)
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    if a.measure_python:
        if not (a.python and a.out):
            ap.error("--measure-python needs --python and --out")
        return measure_python(a, rest)
    if not a.file:
        ap.error("give one results file")
    lines = []
    tables(load(a.file, a.include_disturbed), lines, a.include_disturbed)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.markdown_out:
        with open(a.markdown_out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
