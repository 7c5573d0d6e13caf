#!/usr/bin/env python3
"""Consume outbox rows with a real faststream-outbox 0.19 OutboxBroker (interop helper).

Runs one subscriber on --queue, acks every message, stops after --expect distinct
messages (exit 0) or --timeout seconds (exit 1), shuts the broker down cleanly and
prints ONE JSON list on stdout; see README.md beside this file.
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
    add_consume_args,
    b64,
    emit,
    jsonable,
    make_table,
    run_main,
    stderr_logger,
    to_sqlalchemy_url,
    wait_for_messages,
)


class _DecodeFailed:
    def __init__(self, error: str) -> None:
        self.error = error


async def run(args: argparse.Namespace, out: Any) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    from faststream_outbox import OutboxBroker
    from faststream_outbox.annotations import OutboxMessage

    log = stderr_logger("py_consume", args.verbose)
    table = make_table(args.table, args.schema)
    engine = create_async_engine(to_sqlalchemy_url(args.dsn))
    broker = OutboxBroker(engine, outbox_table=table, logger=log, graceful_timeout=10.0)

    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    done = asyncio.Event()
    if args.expect <= 0:
        done.set()

    async def safe_decoder(msg: Any, original: Any) -> Any:
        # FastStream's own decoder (faststream.message.decode_message via OutboxParser);
        # a failure (e.g. content-type application/json but invalid JSON) is recorded
        # instead of nacking the row into the retry loop.
        try:
            return await original(msg)
        except Exception as exc:  # noqa: BLE001
            return _DecodeFailed(repr(exc))

    @broker.subscriber(
        args.queue,
        decoder=safe_decoder,
        min_fetch_interval=args.min_fetch_interval,
        max_fetch_interval=args.max_fetch_interval,
        fetch_batch_size=args.fetch_batch_size,
    )
    async def handle(msg: OutboxMessage) -> None:
        # FastStream's normal decoding (content-type driven; faststream.message.decode_message).
        decoded = await msg.decode()
        decode_error = None
        if isinstance(decoded, _DecodeFailed):
            decoded, decode_error = None, decoded.error
        row = msg.raw_message  # OutboxInnerMessage (the claimed row)
        records.append(
            {
                "id": int(msg.message_id),
                "message_id": msg.message_id,
                "queue": row.queue,
                "payload_base64": b64(msg.body),
                "content_type": msg.content_type,
                "headers": dict(msg.headers),
                "correlation_id": msg.correlation_id,
                "decoded_body": jsonable(decoded),
                "decoded_type": None if decode_error else type(decoded).__name__,
                "decode_error": decode_error,
                "deliveries_count": row.deliveries_count,
                "attempts_count": row.attempts_count,
                "timer_id": row.timer_id,
            }
        )
        log.debug("handled id=%s (%d records)", msg.message_id, len(records))
        await msg.ack()
        seen.add(msg.message_id)
        if len(seen) >= args.expect:
            done.set()

    started = time.monotonic()
    ok = False
    try:
        await broker.start()
        ok = await wait_for_messages(
            done,
            args.timeout,
            log,
            lambda: f"{len(seen)} of {args.expect} expected messages handled",
        )
        if ok:
            # Stopping within moments of start() cancels the subscriber's LISTEN-connection
            # setup mid-connect, which makes asyncpg print "Future exception was never
            # retrieved" noise (harmless): give the loops a moment to settle first.
            await asyncio.sleep(max(0.0, 0.3 - (time.monotonic() - started)))
    finally:
        # Drains in-flight rows (their ack DELETEs land) before returning.
        await broker.stop()
        await engine.dispose()
    emit(out, records)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_common_args(p)
    add_consume_args(p, timeout=60.0, expect="stop after N distinct messages")
    p.add_argument("--min-fetch-interval", type=float, default=0.05)
    p.add_argument("--max-fetch-interval", type=float, default=0.2)
    p.add_argument("--fetch-batch-size", type=int, default=10)
    return run_main(p, run)


if __name__ == "__main__":
    sys.exit(main())
