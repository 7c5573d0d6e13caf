#!/usr/bin/env python3
"""A faststream-outbox 0.19 consumer sharing a queue with other consumers (interop helper).

Unlike py_consume.py it does not know how many rows it will get: it handles the rows
of --queue (each handler sleeps --delay seconds, then acks) until its standard input
closes (or --timeout passes: exit 1), stops the broker gracefully (in-flight rows are
acked first) and prints ONE JSON list on stdout, one object per handler call:
{"id": row id, "start": wall-clock seconds when the handler began, "end": after the
ack, "deliveries_count": the row's count}. See README.md beside this file.
Never creates or drops tables.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

sys.dont_write_bytecode = True  # keep tests/python/ free of __pycache__

from _interop_common import (  # noqa: E402
    add_common_args,
    emit,
    make_table,
    run_main,
    stderr_logger,
    to_sqlalchemy_url,
)


async def run(args: argparse.Namespace, out: Any) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from faststream_outbox import OutboxBroker
    from faststream_outbox.annotations import OutboxMessage

    log = stderr_logger("py_share", args.verbose)
    table = make_table(args.table, args.schema)
    engine = create_async_engine(to_sqlalchemy_url(args.dsn))
    broker = OutboxBroker(engine, outbox_table=table, logger=log, graceful_timeout=10.0)
    records: list[dict[str, Any]] = []

    @broker.subscriber(
        args.queue,
        max_workers=args.max_workers,
        fetch_batch_size=args.fetch_batch_size,
        min_fetch_interval=args.min_fetch_interval,
        max_fetch_interval=args.max_fetch_interval,
        lease_ttl_seconds=args.lease_ttl,
    )
    async def handle(msg: OutboxMessage) -> None:
        start = time.time()
        await asyncio.sleep(args.delay)
        await msg.ack()
        records.append(
            {
                "id": int(msg.message_id),
                "start": start,
                "end": time.time(),
                "deliveries_count": msg.raw_message.deliveries_count,
            }
        )

    ok = False
    try:
        await broker.start()
        loop = asyncio.get_running_loop()
        # EOF on stdin: the test saw the outbox empty.
        eof = loop.run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(eof, timeout=args.timeout)
            ok = True
        except TimeoutError:
            log.error("timeout after %.1fs: stdin still open", args.timeout)
    finally:
        await broker.stop()
        await engine.dispose()
    emit(out, records)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_common_args(p)
    p.add_argument("--delay", type=float, default=0.05, help="seconds each handler sleeps")
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--fetch-batch-size", type=int, default=10)
    p.add_argument("--min-fetch-interval", type=float, default=0.02)
    p.add_argument("--max-fetch-interval", type=float, default=0.2)
    p.add_argument("--lease-ttl", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=60.0, help="give up after S seconds (exit 1)")
    p.add_argument("--verbose", action="store_true")
    return run_main(p, run)


if __name__ == "__main__":
    sys.exit(main())
