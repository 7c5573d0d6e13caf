#!/usr/bin/env python3
"""Publish outbox rows with the real faststream-outbox 0.19 API (interop helper).

Prints ONE JSON document on stdout; see README.md beside this file.
Never creates or drops tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

sys.dont_write_bytecode = True  # keep tests/python/ free of __pycache__

from _interop_common import (  # noqa: E402
    add_stored,
    add_common_args,
    b64,
    emit,
    make_table,
    stderr_logger,
    take_stdout,
    to_sqlalchemy_url,
)


# (case, body, headers passed, correlation_id passed, expected_body as JSON,
#  content-type faststream-outbox is expected to store (None = no content-type header))
def _cases() -> list[tuple[str, Any, dict[str, str], str | None, Any, str | None]]:
    return [
        (
            "dict",
            {"order_id": 7, "note": "ünïcode"},
            {"x-tenant": "acme"},
            None,
            {"order_id": 7, "note": "ünïcode"},
            "application/json",
        ),
        ("str", "hello outbox", {}, None, "hello outbox", "text/plain"),
        ("int", 42, {}, None, 42, "application/json"),
        ("bytes", b"\x00\x01raw", {}, None, {"base64": b64(b"\x00\x01raw")}, None),
        ("list", [1, 2, 3], {}, None, [1, 2, 3], "application/json"),
        (
            "explicit_correlation",
            {"kind": "explicit", "n": 1},
            {},
            "corr-123",
            {"kind": "explicit", "n": 1},
            "application/json",
        ),
        ("none", None, {}, None, None, None),
        ("empty_str", "", {}, None, "", "text/plain"),
        (
            "nested",
            {"a": [1, {"b": None, "c": True}], "f": 1.5, "s": "x\"y\\z"},
            {"x-one": "1", "x-two": "two"},
            None,
            {"a": [1, {"b": None, "c": True}], "f": 1.5, "s": "x\"y\\z"},
            "application/json",
        ),
    ]


async def run(args: argparse.Namespace, out: Any) -> int:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from faststream_outbox import OutboxBroker

    log = stderr_logger("py_publish", args.verbose)
    table = make_table(args.table, args.schema)
    engine = create_async_engine(to_sqlalchemy_url(args.dsn))
    broker = OutboxBroker(engine, outbox_table=table, logger=log)
    results: list[dict[str, Any]] = []
    try:
        await broker.connect()
        # ONE transaction for every publish: the rows commit together at the end.
        async with AsyncSession(engine) as session, session.begin():
            if args.count is not None:
                body = json.loads(args.body_json)
                for _ in range(args.count):
                    row_id = await broker.publish(body, queue=args.queue, session=session)
                    results.append({"id": row_id})
            else:
                for case, body, headers, corr, expected, ctype in _cases():
                    row_id = await broker.publish(
                        body,
                        queue=args.queue,
                        session=session,
                        headers=dict(headers) or None,
                        correlation_id=corr,
                    )
                    results.append(
                        {
                            "id": row_id,
                            "case": case,
                            "expected_body": expected,
                            "headers": headers,
                            "correlation_id": corr,
                            "expected_content_type": ctype,
                        }
                    )
        if args.count is not None:
            emit(out, [r["id"] for r in results])
            return 0
        # Committed: read back exactly what faststream-outbox stored (read-only).
        await add_stored(engine, table, results)
        emit(out, results)
        return 0
    finally:
        await broker.stop()
        await engine.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_common_args(p)
    p.add_argument("--count", type=int, default=None, help="bulk mode: publish N copies of --body-json")
    p.add_argument("--body-json", default=None, help="bulk mode: the body, as JSON text")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if (args.count is None) != (args.body_json is None):
        p.error("--count and --body-json go together")
    if args.count is not None and args.count < 0:
        p.error("--count must be >= 0")
    out = take_stdout()
    return asyncio.run(run(args, out))


if __name__ == "__main__":
    sys.exit(main())
