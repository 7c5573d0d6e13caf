"""Shared helpers of the interop scripts beside this file (see README.md)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def take_stdout() -> Any:
    """Reserve the real stdout for our one JSON document.

    Everything else that might print (FastStream's logger, warnings, stray prints)
    is sent to stderr by pointing ``sys.stdout`` at it; the returned file writes to
    the original stdout file descriptor.
    """
    real = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    sys.stdout = sys.stderr
    return real


def emit(out: Any, doc: Any) -> None:
    out.write(json.dumps(doc, ensure_ascii=False))
    out.write("\n")
    out.flush()


def to_sqlalchemy_url(dsn: str) -> str:
    """``postgres://user@host:port/db`` -> ``postgresql+asyncpg://user@host:port/db``.

    ``sslmode`` (a libpq/sqlx parameter that asyncpg's SQLAlchemy dialect does not
    accept) is dropped; other query parameters are kept.
    """
    parts = urlsplit(dsn)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        scheme = "postgresql+asyncpg"
    else:
        msg = f"--dsn must be a postgres:// or postgresql:// URL, got scheme {parts.scheme!r}"
        raise SystemExit(msg)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "sslmode"])
    return urlunsplit((scheme, parts.netloc, parts.path, query, parts.fragment))


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", required=True, help="postgres://user@host:port/db")
    p.add_argument("--table", required=True, help="outbox table name (must already exist)")
    p.add_argument("--schema", default=None, help="schema of the table (default: search_path)")
    p.add_argument("--queue", required=True, help="queue name")


def add_consume_args(p: argparse.ArgumentParser, timeout: float, expect: str) -> None:
    """``--expect N`` (help ``expect``), ``--timeout S`` (default ``timeout``) and
    ``--verbose``: the arguments of every consumer that stops after N messages."""
    p.add_argument("--expect", type=int, required=True, help=expect)
    p.add_argument("--timeout", type=float, default=timeout, help="give up after S seconds (exit 1)")
    p.add_argument("--verbose", action="store_true")


def run_main(
    p: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace, Any], Awaitable[int]],
) -> int:
    """Parses the arguments, reserves stdout for the JSON document (take_stdout)
    and runs ``run(args, out)``; its exit status."""
    args = p.parse_args()
    out = take_stdout()
    return asyncio.run(run(args, out))


async def wait_for_messages(
    done: asyncio.Event,
    timeout: float,
    log: logging.Logger | None = None,
    progress: Callable[[], str] | None = None,
) -> bool:
    """Waits up to ``timeout`` seconds for ``done``; whether it was set. On a
    timeout, logs ``progress()`` (e.g. "3 of 5 expected messages") to ``log``."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(done.wait(), timeout=timeout)
        return True
    except TimeoutError:
        if log is not None:
            log.error(
                "timeout after %.1fs: %s",
                time.monotonic() - started,
                progress() if progress is not None else "not done",
            )
        return False


class Collected:
    """The records a bus consumer keeps until ``expect`` of them arrived."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.records: list[dict[str, Any]] = []
        self.done = asyncio.Event()

    def add(self, record: dict[str, Any]) -> None:
        """Keeps ``record``; the last expected one sets ``done``."""
        self.records.append(record)
        if len(self.records) >= self.expect:
            self.done.set()

    async def consume(
        self,
        broker: Any,
        timeout: float,
        log: logging.Logger | None = None,
        ready: Callable[[], None] | None = None,
    ) -> bool:
        """Starts ``broker`` (then calls ``ready``), waits up to ``timeout`` seconds
        for the expected records and stops it; whether they all arrived."""
        try:
            await broker.start()
            if ready is not None:
                ready()
            return await wait_for_messages(
                self.done,
                timeout,
                log,
                lambda: f"{len(self.records)} of {self.expect} expected messages",
            )
        finally:
            await broker.stop()


def make_table(table: str, schema: str | None) -> Any:
    from sqlalchemy import MetaData

    from faststream_outbox import make_outbox_table

    # Only builds the SQLAlchemy Table object; nothing is created in the database.
    return make_outbox_table(MetaData(schema=schema), table)


async def add_stored(engine: Any, table: Any, results: list[dict[str, Any]]) -> None:
    """Adds to each result (by its ``id``) what the table stores for that row:
    ``queue``, ``stored_payload_base64`` and ``stored_headers`` (read-only)."""
    from sqlalchemy import select

    ids = [r["id"] for r in results]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(table.c.id, table.c.queue, table.c.payload, table.c.headers).where(
                    table.c.id.in_(ids)
                )
            )
        ).all()
    stored = {row.id: row for row in rows}
    for r in results:
        row = stored[r["id"]]
        r["queue"] = row.queue
        r["stored_payload_base64"] = b64(row.payload)
        r["stored_headers"] = jsonable(row.headers)


def jsonable(value: Any) -> Any:
    """A decoded body as JSON: bytes become ``{"base64": "..."}`` (also nested)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"repr": repr(value)}


def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def stderr_logger(name: str, verbose: bool) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(h)
    logger.propagate = False
    return logger
