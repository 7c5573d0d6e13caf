"""What the table scripts of bench/ share: reading outbox-bench's JSON points
and the median [min-max] / ratio formatting of their figures."""
from __future__ import annotations

import json
import statistics
import sys


def load(path, include_disturbed):
    """The points of a JSON-lines results file: error points are reported on
    stderr and skipped, and so are disturbed ones unless asked for."""
    out = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "error" in d:
            print(f"note: error point skipped: {d.get('scenario')} {d.get('error')}", file=sys.stderr)
            continue
        if d.get("disturbed") and not include_disturbed:
            continue
        out.append(d)
    return out


def med(xs):
    """The median of the values that are there; None without any."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(xs, digits=0):
    """`median [min–max]`, `v (1 run)`, or `–`."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    f = lambda v: f"{v:,.{digits}f}"  # noqa: E731
    if len(xs) == 1:
        return f"{f(xs[0])} (1 run)"
    return f"{f(med(xs))} [{f(min(xs))}–{f(max(xs))}]"


def ratio(a, b, digits=2):
    """The ratio of the medians of `a` and `b`, or `–`."""
    ma, mb = med(a), med(b)
    if not ma or not mb:
        return "–"
    return f"{ma / mb:.{digits}f}"
