#!/usr/bin/env python3
"""Publish the rows the relay interop tests forward to Kafka (faststream-outbox 0.19).

Like py_publish.py in cases mode (same output: one JSON list on stdout, one
object per row, with the payload and headers read back after commit), with
two case sets chosen by ``--set``:

* ``headers``: typed bodies with producer headers (``x-tenant: acme`` on every
  row, more on some, one explicit correlation id), for header propagation;
* ``bodies``: bodies whose bytes a relay must not change (a JSON object with
  keys in non-sorted order, unicode text, plain text, empty bodies, raw
  bytes), each with ``x-tenant: acme`` and ``x-case: <case>``, for the
  byte-exact pass-through.

Never creates or drops tables.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

sys.dont_write_bytecode = True  # keep tests/python/ free of __pycache__

from _interop_common import (  # noqa: E402
    add_stored,
    add_common_args,
    emit,
    jsonable,
    make_table,
    run_main,
    stderr_logger,
    to_sqlalchemy_url,
)

TENANT = {"x-tenant": "acme"}

# (case, body, headers passed, correlation_id passed,
#  content-type faststream-outbox is expected to store (None = no content-type header))
Case = tuple[str, Any, dict[str, str], "str | None", "str | None"]


def _headers_cases() -> list[Case]:
    return [
        ("object", {"order_id": 11, "note": "x"}, dict(TENANT), None, "application/json"),
        (
            "object_with_correlation",
            {"order_id": 12},
            {**TENANT, "x-trace": "t-12"},
            "corr-py-12",
            "application/json",
        ),
        ("text", "hello relay", dict(TENANT), None, "text/plain"),
    ]


def _bodies_cases() -> list[Case]:
    cases: list[tuple[str, Any, str | None]] = [
        # Keys not in sorted order: a serde_json::Value round trip would sort them.
        ("json_object", {"order_id": 11, "note": "x"}, "application/json"),
        ("json_nested", {"z": 1, "a": {"y": [1.5, None, True], "b": "ünï ✓"}}, "application/json"),
        ("json_int", 42, "application/json"),
        ("unicode_text", "héllo ✓", "text/plain"),
        ("text", "plain text", "text/plain"),
        ("empty_text", "", "text/plain"),
        ("empty", None, None),
        ("bytes", b"\x00\x01raw\xff", None),
    ]
    return [(name, body, {**TENANT, "x-case": name}, None, ct) for name, body, ct in cases]


SETS = {"headers": _headers_cases, "bodies": _bodies_cases}


async def run(args: argparse.Namespace, out: Any) -> int:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from faststream_outbox import OutboxBroker

    log = stderr_logger("py_publish_relay", args.verbose)
    table = make_table(args.table, args.schema)
    engine = create_async_engine(to_sqlalchemy_url(args.dsn))
    broker = OutboxBroker(engine, outbox_table=table, logger=log)
    results: list[dict[str, Any]] = []
    try:
        await broker.connect()
        # ONE transaction for every publish: the rows commit together at the end.
        async with AsyncSession(engine) as session, session.begin():
            for case, body, headers, corr, ctype in SETS[args.set]():
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
                        "expected_body": jsonable(body),
                        "headers": headers,
                        "correlation_id": corr,
                        "expected_content_type": ctype,
                    }
                )
        # Committed: read back exactly what faststream-outbox stored (read-only).
        await add_stored(engine, table, results)
        emit(out, results)
        return 0
    finally:
        await broker.stop()
        await engine.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--set", required=True, choices=sorted(SETS), help="which rows to publish")
    p.add_argument("--verbose", action="store_true")
    return run_main(p, run)


if __name__ == "__main__":
    sys.exit(main())
