#!/usr/bin/env python3
"""The Python side of scripts/bench-compare.sh: faststream-outbox 0.19 on the same
workloads as ``outbox-bench`` (Rust), printing ONE JSON object per run in the same
shape (scenario, params, messages, seconds, throughput_msg_s, latency_ms,
round_trips_per_msg, statements_per_msg, wal_bytes_per_msg, dead_tuples, rows_left,
cpu, peak_rss_mib, load).

Scenarios (one per process, so the peak RSS is the run's own):

  drain    --backlog N --workers W --fetch-batch-size B --tfbs T
           a prefilled backlog (raw INSERT ... SELECT, no NOTIFY, then VACUUM ANALYZE,
           exactly as outbox-bench prefills) drained by a no-op handler;
           min/max_fetch_interval 0.001 / 0.01 (as the upstream harness).
  produce  --mode single|batch [--batch-size 100] --messages N
           single: one transaction per publish (BEGIN; broker.publish; COMMIT);
           batch: one transaction per broker.publish_batch of --batch-size bodies.
  latency  --samples N --interval-ms 20
           single publishes on an idle subscriber at the package defaults
           (1 worker, fetch_batch_size 10, fetch 1 s / 10 s, LISTEN on):
           COMMIT returned -> handler start, same event loop.

Only the public API is used: OutboxBroker, make_outbox_table, broker.publish,
broker.publish_batch, @broker.subscriber(...). The probe (pg_stat_statements,
pg_current_wal_lsn, pg_stat_user_tables) runs on its own asyncpg connection and
its statements carry the marker comment the Rust probe uses, so both sides count
the same way (toplevel calls in the benchmark database, probe excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

sys.dont_write_bytecode = True

PROBE = "/* outbox-bench-probe */"
QUEUE = "bench"
TICKS = 100.0  # USER_HZ


# --------------------------------------------------------------------------- system


def _proc_stat(pid: str) -> tuple[int, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rfind(")") + 1 :].split()
    try:
        return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])
    except (IndexError, ValueError):
        return None


def _pids() -> list[str]:
    try:
        return [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def rustc_count() -> int:
    return sum(1 for p in _pids() if _comm(p) == "rustc")


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def postgres_cpu(postmaster: int | None) -> float | None:
    if postmaster is None:
        return None
    st = _proc_stat(str(postmaster))
    if st is None:
        return None
    ticks = st[1] + st[2]
    for p in _pids():
        s = _proc_stat(p)
        if s and s[0] == postmaster:
            ticks += s[1]
    return ticks / TICKS


def machine_cpu() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    total = sum(v)
    idle = v[3] + v[4]
    return (total - idle) / TICKS, total / TICKS


def self_cpu() -> float | None:
    st = _proc_stat("self")
    return None if st is None else st[1] / TICKS


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError):
        return None
    return None


class Cpu:
    def __init__(self, postmaster: int | None) -> None:
        self.at = time.perf_counter()
        self.bench = self_cpu()
        self.pg = postgres_cpu(postmaster)
        self.machine = machine_cpu()

    def delta(self, later: Cpu) -> dict[str, Any]:
        wall = max(later.at - self.at, 1e-9)

        def d(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(b - a, 0.0)

        bench, pg = d(self.bench, later.bench), d(self.pg, later.pg)
        busy = total = None
        if self.machine and later.machine:
            busy, total = later.machine[0] - self.machine[0], later.machine[1] - self.machine[1]
        other = None if None in (busy, bench, pg) else max(busy - bench - pg, 0.0)  # type: ignore[operator]

        def r(v: float | None, n: int = 3) -> float | None:
            return None if v is None else round(v, n)

        return {
            "wall_s": r(wall),
            "bench_cpu_s": r(bench),
            "postgres_cpu_s": r(pg),
            "machine_busy_cpu_s": r(busy),
            "other_cpu_s": r(other),
            "bench_cores": r(None if bench is None else bench / wall),
            "postgres_cores": r(None if pg is None else pg / wall),
            "other_cores": r(None if other is None else other / wall),
            "machine_busy_cores": r(None if busy is None else busy / wall),
            "machine_cores": r(None if total is None else total / wall, 2),
        }


# --------------------------------------------------------------------------- database


def sqlalchemy_url(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.scheme.lower() not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise SystemExit(f"--database-url must be postgres://..., got {parts.scheme!r}")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "sslmode"])
    return urlunsplit(("postgresql+asyncpg", parts.netloc, parts.path, query, parts.fragment))


def asyncpg_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def keyword(query: str) -> str:
    q = query.lstrip()
    while True:
        if q.startswith("/*"):
            end = q.find("*/")
            q = "" if end < 0 else q[end + 2 :].lstrip()
        elif q.startswith("--"):
            end = q.find("\n")
            q = "" if end < 0 else q[end + 1 :].lstrip()
        else:
            break
    word = ""
    for ch in q:
        if not ch.isalpha():
            break
        word += ch
    word = word.lower()
    return {
        "select": "select",
        "insert": "insert",
        "update": "update",
        "delete": "delete",
        "with": "with",
        "begin": "begin",
        "start": "begin",
        "commit": "commit",
        "end": "commit",
        "rollback": "rollback",
        "listen": "listen",
    }.get(word, "other")


class Probe:
    """One asyncpg connection reading PostgreSQL's counters (never counted)."""

    def __init__(self, conn: Any, table: str, postmaster: int | None) -> None:
        self.conn = conn
        self.table = table
        self.postmaster = postmaster

    @classmethod
    async def connect(cls, dsn: str, table: str) -> Probe:
        import asyncpg

        conn = await asyncpg.connect(asyncpg_dsn(dsn), server_settings={"application_name": "outbox-bench-probe"})
        pid = await conn.fetchval(f"SELECT {PROBE} pg_backend_pid()")
        postmaster = None
        if _comm(str(pid)).startswith("postgres"):
            st = _proc_stat(str(pid))
            postmaster = st[0] if st else None
        return cls(conn, table, postmaster)

    async def wait_backends(self, keep: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.conn.fetchval(
                f"SELECT {PROBE} count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            if n <= keep or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.02)

    async def snapshot(self) -> dict[str, Any]:
        rows = await self.conn.fetch(
            f"SELECT {PROBE} queryid, userid::oid::int8 AS userid, query, calls, total_exec_time, rows "
            "FROM pg_stat_statements WHERE toplevel AND queryid IS NOT NULL "
            "AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        stmts = {
            (r["queryid"], r["userid"]): (r["query"], r["calls"], r["total_exec_time"], r["rows"])
            for r in rows
            if PROBE not in r["query"] and "pg_stat" not in r["query"].lower()
        }
        lsn = await self.conn.fetchval(f"SELECT {PROBE} pg_current_wal_lsn()::text")
        hi, lo = lsn.split("/")
        t = await self.conn.fetchrow(
            f"SELECT {PROBE} n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, n_dead_tup "
            "FROM pg_stat_user_tables WHERE relid = $1::regclass",
            self.table,
        )
        return {
            "stmts": stmts,
            "lsn": (int(hi, 16) << 32) | int(lo, 16),
            "table": tuple(t) if t else (0, 0, 0, 0, 0),
            "cpu": Cpu(self.postmaster),
        }

    async def count(self) -> int:
        return await self.conn.fetchval(f"SELECT {PROBE} count(*) FROM {self.table}")


def delta(before: dict[str, Any], after: dict[str, Any], cpu_end: Cpu, messages: int) -> dict[str, Any]:
    m = max(messages, 1)
    by_kw: dict[str, int] = {}
    calls = 0
    exec_ms = 0.0
    top = []
    for k, (q, c, ms, rows) in after["stmts"].items():
        c0, ms0, r0 = before["stmts"].get(k, (q, 0, 0.0, 0))[1:]
        dc = c - c0
        if dc <= 0:
            continue
        calls += dc
        exec_ms += ms - ms0
        kw = keyword(q)
        by_kw[kw] = by_kw.get(kw, 0) + dc
        top.append((ms - ms0, " ".join(q.split())[:160], dc, rows - r0))
    top.sort(reverse=True)
    tb, ta = before["table"], after["table"]
    return {
        "round_trips_per_msg": round(calls / m, 4),
        "statements_per_msg": {k: round(v / m, 4) for k, v in sorted(by_kw.items())},
        "statement_calls": dict(sorted(by_kw.items())),
        "wal_bytes_per_msg": round((after["lsn"] - before["lsn"]) / m, 1),
        "wal_bytes": after["lsn"] - before["lsn"],
        "tuples": {
            "inserted": ta[0] - tb[0],
            "updated": ta[1] - tb[1],
            "hot_updated": ta[2] - tb[2],
            "deleted": ta[3] - tb[3],
        },
        "dead_tuples": ta[4],
        "pg_exec_ms_per_msg": round(exec_ms / m, 5),
        "cpu": before["cpu"].delta(cpu_end),
        "top_statements": [
            {
                "query": q,
                "calls": c,
                "calls_per_msg": round(c / m, 4),
                "total_ms": round(ms, 2),
                "mean_ms": round(ms / max(c, 1), 4),
                "rows": rows,
                "rows_per_call": round(rows / max(c, 1), 2),
            }
            for ms, q, c, rows in top[:8]
        ],
    }


def percentiles(samples: list[float]) -> dict[str, Any] | None:
    if not samples:
        return None
    s = sorted(samples)
    n = len(s)

    def at(p: float) -> float:
        import math

        rank = min(max(math.ceil(p / 100.0 * n), 1), n)
        return round(s[rank - 1], 3)

    return {
        "samples": n,
        "p50": at(50),
        "p95": at(95),
        "p99": at(99),
        "max": round(s[-1], 3),
        "min": round(s[0], 3),
        "mean": round(sum(s) / n, 3),
    }


async def setup_table(args: argparse.Namespace) -> tuple[Any, str]:
    """A fresh pybench_<random> table made by make_outbox_table, autovacuum off."""
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import create_async_engine

    from faststream_outbox import make_outbox_table

    name = f"pybench_{uuid.uuid4().hex[:10]}"
    md = MetaData()
    table = make_outbox_table(md, name)
    eng = create_async_engine(sqlalchemy_url(args.database_url))
    async with eng.begin() as conn:
        await conn.run_sync(md.create_all)
    await eng.dispose()
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(args.database_url))
    await conn.execute(f'ALTER TABLE "{name}" SET (autovacuum_enabled = false)')
    await conn.close()
    return table, name


async def prefill(args: argparse.Namespace, name: str, n: int) -> float:
    import asyncpg

    t0 = time.perf_counter()
    conn = await asyncpg.connect(asyncpg_dsn(args.database_url))
    sql = (
        f'INSERT INTO "{name}" (queue, payload, headers) '
        "SELECT $1, convert_to('{\"payload\":\"' || repeat('x', $2) || '\"}', 'UTF8'), "
        "jsonb_build_object('content-type', 'application/json', 'correlation_id', gen_random_uuid()::text) "
        "FROM generate_series(1, $3)"
    )
    left = n
    while left > 0:
        chunk = min(left, 100_000)
        await conn.execute(sql, QUEUE, max(args.payload_bytes - 14, 0), chunk)
        left -= chunk
    await conn.execute(f'VACUUM ANALYZE "{name}"')
    await conn.close()
    return time.perf_counter() - t0


async def drop_table(args: argparse.Namespace, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(args.database_url))
    await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
    await conn.close()


class Window:
    async def open(self, args: argparse.Namespace, name: str, keep: int) -> None:
        self.probe = await Probe.connect(args.database_url, f'"{name}"')
        await self.probe.wait_backends(keep)
        await self.probe.conn.execute(f"{PROBE} CHECKPOINT")
        self.before = await self.probe.snapshot()
        self.rss_reset = reset_peak_rss()
        self.load_start = loadavg()
        self.rustc_start = rustc_count()

    async def close(
        self,
        *,
        scenario: str,
        params: dict[str, Any],
        messages: int,
        seconds: float,
        cpu_end: Cpu,
        latency: dict[str, Any] | None,
        extra: dict[str, Any],
        expect_rows: int,
    ) -> dict[str, Any]:
        peak = status_mib("VmHWM:")
        await self.probe.wait_backends(0)
        # PostgreSQL's CPU once the run's backends were reaped (their CPU reaches
        # the postmaster's children counter only then), as outbox-bench does.
        await asyncio.sleep(0.1)
        cpu_end.pg = Cpu(self.probe.postmaster).pg or cpu_end.pg
        after = await self.probe.snapshot()
        rows_left = await self.probe.count()
        await self.probe.conn.close()
        out: dict[str, Any] = {
            "scenario": scenario,
            "impl": "python",
            "params": params,
            "messages": messages,
            "seconds": round(seconds, 4),
            "throughput_msg_s": round(messages / max(seconds, 1e-9), 1),
            "latency_ms": latency,
        }
        out.update(delta(self.before, after, cpu_end, messages))
        out["rows_left"] = rows_left
        out["peak_rss_mib"] = peak if self.rss_reset else None
        out["rss_end_mib"] = status_mib("VmRSS:")
        out["load"] = {
            "loadavg_start": self.load_start,
            "loadavg_end": loadavg(),
            "rustc_start": self.rustc_start,
            "rustc_end": rustc_count(),
        }
        out["build"] = {"faststream_outbox": _version("faststream-outbox"), "python": sys.version.split()[0]}
        out["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.update(extra)
        if rows_left != expect_rows:
            out["error"] = f"{rows_left} rows left, expected {expect_rows}"
        return out


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def make_engine(args: argparse.Namespace, pool_size: int) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(
        sqlalchemy_url(args.database_url),
        pool_size=pool_size,
        max_overflow=2,
        connect_args={"server_settings": {"application_name": "outbox-bench-python"}},
    )


async def warm(engine: Any) -> None:
    """First connect (SQLAlchemy's dialect initialisation) before the window."""
    from sqlalchemy import text

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


# --------------------------------------------------------------------------- scenarios


async def drain(args: argparse.Namespace, out: Any) -> int:
    from faststream_outbox import OutboxBroker

    table, name = await setup_table(args)
    try:
        pre = await prefill(args, name, args.backlog)
        engine = make_engine(args, args.workers + 2)
        await warm(engine)
        broker = OutboxBroker(engine, outbox_table=table, logger=None, graceful_timeout=15.0)
        n = args.backlog
        handled = 0
        marks: list[float] = []
        done = asyncio.Event()
        bounds = {-(-n * k // 10): k for k in range(1, 11)}

        @broker.subscriber(
            QUEUE,
            max_workers=args.workers,
            fetch_batch_size=args.fetch_batch_size,
            terminal_flush_batch_size=args.tfbs,
            min_fetch_interval=args.min_fetch,
            max_fetch_interval=args.max_fetch,
        )
        # The body alone, unannotated (the upstream harness, benchmarks/workload.py,
        # takes the body too): an `OutboxMessage` parameter costs faststream about
        # twice the CPU per message, and `bytes` does not validate a JSON body.
        async def handle(body) -> None:  # noqa: ANN001
            nonlocal handled
            handled += 1
            if handled in bounds:
                marks.append(time.perf_counter())
            if handled >= n:
                done.set()

        w = Window()
        await w.open(args, name, keep=1)
        t0 = time.perf_counter()
        await broker.start()
        try:
            await asyncio.wait_for(done.wait(), timeout=120 + n * 0.005)
        finally:
            handled_s = time.perf_counter() - t0
            await broker.stop()
            seconds = time.perf_counter() - t0
            cpu_end = Cpu(w.probe.postmaster)
            await engine.dispose()
        slices = []
        prev_t, prev_n = t0, 0
        for k, at in zip(sorted(bounds.values()), marks, strict=False):
            cnt = -(-n * k // 10)
            slices.append(
                {"upto_pct": k * 10, "at_s": round(at - t0, 3), "msg_s": round((cnt - prev_n) / max(at - prev_t, 1e-9))}
            )
            prev_t, prev_n = at, cnt
        res = await w.close(
            scenario="drain",
            params={
                "backlog": n,
                "workers": args.workers,
                "fetch_batch_size": args.fetch_batch_size,
                "ack_batch": args.tfbs,
                "min_fetch_ms": args.min_fetch * 1000,
                "max_fetch_ms": args.max_fetch * 1000,
                "listen": True,
                "payload_bytes": args.payload_bytes,
            },
            messages=n,
            seconds=seconds,
            cpu_end=cpu_end,
            latency=None,
            extra={
                "handled": handled,
                "handled_seconds": round(handled_s, 4),
                "slices": slices,
                "prefill_seconds": round(pre, 2),
            },
            expect_rows=0,
        )
    finally:
        await drop_table(args, name)
    emit(out, res)
    return 0 if "error" not in res else 1


async def produce(args: argparse.Namespace, out: Any) -> int:
    from faststream_outbox import OutboxBroker

    table, name = await setup_table(args)
    try:
        per_tx = args.batch_size if args.mode == "batch" else 1
        txs = -(-args.messages // per_tx)
        messages = txs * per_tx
        engine = make_engine(args, 2)
        await warm(engine)
        broker = OutboxBroker(engine, outbox_table=table, logger=None)
        body = {"payload": "x" * max(args.payload_bytes - 14, 0)}
        bodies = [body] * per_tx
        lat: list[float] = []
        w = Window()
        await w.open(args, name, keep=1)
        t0 = time.perf_counter()
        async with engine.connect() as conn:
            for _ in range(txs):
                t = time.perf_counter()
                async with conn.begin():
                    if args.mode == "batch":
                        await broker.publish_batch(*bodies, queue=QUEUE, session=conn)
                    else:
                        await broker.publish(body, queue=QUEUE, session=conn)
                lat.append((time.perf_counter() - t) * 1000)
        seconds = time.perf_counter() - t0
        cpu_end = Cpu(w.probe.postmaster)
        await engine.dispose()
        res = await w.close(
            scenario="produce",
            params={
                "mode": args.mode,
                "rows_per_tx": per_tx,
                "concurrency": 1,
                "payload_bytes": args.payload_bytes,
            },
            messages=messages,
            seconds=seconds,
            cpu_end=cpu_end,
            latency=percentiles(lat),
            extra={"transactions": txs},
            expect_rows=messages,
        )
    finally:
        await drop_table(args, name)
    emit(out, res)
    return 0 if "error" not in res else 1


async def latency(args: argparse.Namespace, out: Any) -> int:
    from faststream_outbox import OutboxBroker

    table, name = await setup_table(args)
    try:
        engine = make_engine(args, 4)
        await warm(engine)
        broker = OutboxBroker(engine, outbox_table=table, logger=None)
        total = args.warmup + args.samples
        handled: dict[int, float] = {}
        done = asyncio.Event()

        @broker.subscriber(QUEUE)  # package defaults: 1 worker, batch 10, fetch 1 s / 10 s
        async def handle(body) -> None:  # noqa: ANN001
            # The body alone (as in drain): {"payload": "<8-digit sequence>xxx…"}.
            handled[int(body["payload"][:8])] = time.perf_counter()
            if len(handled) >= total:
                done.set()

        filler = "x" * max(args.payload_bytes - 14 - 8, 0)
        w = Window()
        await w.open(args, name, keep=1)
        await broker.start()
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        commits: list[tuple[int, float, float, float]] = []
        interval = args.interval_ms / 1000.0
        async with engine.connect() as conn:
            next_at = time.perf_counter()
            for seq in range(total):
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
                begin = time.perf_counter()
                tx = await conn.begin()
                await broker.publish({"payload": f"{seq:08d}{filler}"}, queue=QUEUE, session=conn)
                sent = time.perf_counter()
                await tx.commit()
                commits.append((seq, begin, sent, time.perf_counter()))
        try:
            await asyncio.wait_for(done.wait(), timeout=60)
        finally:
            seconds = time.perf_counter() - t0
            await broker.stop()
            cpu_end = Cpu(w.probe.postmaster)
            await engine.dispose()
        to_handler, sent_to_handler, txn, commit_rt = [], [], [], []
        for seq, begin, sent, committed in commits[args.warmup :]:
            txn.append((committed - begin) * 1000)
            commit_rt.append((committed - sent) * 1000)
            if seq in handled:
                to_handler.append((handled[seq] - committed) * 1000)
                sent_to_handler.append((handled[seq] - sent) * 1000)
        res = await w.close(
            scenario="latency",
            params={
                "samples": args.samples,
                "warmup": args.warmup,
                "interval_ms": args.interval_ms,
                "listen": True,
                "payload_bytes": args.payload_bytes,
                "subscriber": "defaults (1 worker, fetch_batch_size 10, fetch 1 s / 10 s)",
            },
            messages=total,
            seconds=seconds,
            cpu_end=cpu_end,
            latency=percentiles(to_handler),
            extra={
                "latency_what": "COMMIT returned -> handler start",
                "commit_to_handler_ms": percentiles(to_handler),
                "commit_sent_to_handler_ms": percentiles(sent_to_handler),
                "publish_txn_ms": percentiles(txn),
                "commit_round_trip_ms": percentiles(commit_rt),
            },
            expect_rows=0,
        )
    finally:
        await drop_table(args, name)
    emit(out, res)
    return 0 if "error" not in res else 1


# --------------------------------------------------------------------------- main


def take_stdout() -> Any:
    """Keep the real stdout for our JSON; anything else that prints goes to stderr."""
    real = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    sys.stdout = sys.stderr
    return real


def emit(out: Any, doc: Any) -> None:
    out.write(json.dumps(doc) + "\n")
    out.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5433/outbox_bench"),
    )
    p.add_argument("--payload-bytes", type=int, default=256)
    sub = p.add_subparsers(dest="scenario", required=True)
    d = sub.add_parser("drain")
    d.add_argument("--backlog", type=int, default=10_000)
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--fetch-batch-size", type=int, default=100)
    d.add_argument("--tfbs", type=int, default=1)
    d.add_argument("--min-fetch", type=float, default=0.001)
    d.add_argument("--max-fetch", type=float, default=0.01)
    r = sub.add_parser("produce")
    r.add_argument("--mode", choices=["single", "batch"], default="single")
    r.add_argument("--batch-size", type=int, default=100)
    r.add_argument("--messages", type=int, default=5_000)
    lat = sub.add_parser("latency")
    lat.add_argument("--samples", type=int, default=1000)
    lat.add_argument("--warmup", type=int, default=20)
    lat.add_argument("--interval-ms", type=float, default=20.0)
    args = p.parse_args()
    out = take_stdout()
    fn = {"drain": drain, "produce": produce, "latency": latency}[args.scenario]
    try:
        return asyncio.run(fn(args, out))
    except Exception as exc:  # noqa: BLE001
        print(f"py_bench: ERROR: {exc!r}", file=sys.stderr)
        emit(out, {"scenario": args.scenario, "impl": "python", "error": repr(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
