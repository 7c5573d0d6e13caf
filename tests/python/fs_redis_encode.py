"""Encode a few messages with FastStream's own Redis message format
(BinaryMessageFormatV1, FastStream 0.7's default) and print the bytes, so the
Rust side can check that outbox-redis writes exactly the same frames.

    fs_redis_encode.py

stdout: one JSON document, a list of cases, each with "frame_b64" (what
FastStream's publisher writes), "body_b64" (the encoded body), "content_type"
(or null), "correlation_id" and "headers" (the publish's own headers, in
order). Every case publishes with headers outbox-id, x and message_id, as the
Rust transport assembles them for outbox row 7.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from typing import Any

from _interop_common import emit, take_stdout
from faststream.redis.parser import BinaryMessageFormatV1


async def main() -> int:
    out = take_stdout()
    headers = {"outbox-id": "7", "x": "1", "message_id": "7"}
    cases: list[dict[str, Any]] = []
    for message in ["hi", {"a": 1}, b"\x00\x9f", "Zoë"]:
        frame = await BinaryMessageFormatV1.encode(
            message=message,
            reply_to=None,
            headers=dict(headers),
            correlation_id="c-1",
        )
        body, parsed = BinaryMessageFormatV1.parse(frame)
        cases.append(
            {
                "frame_b64": base64.b64encode(frame).decode(),
                "body_b64": base64.b64encode(body).decode(),
                "content_type": parsed.get("content-type"),
                "correlation_id": parsed["correlation_id"],
                "headers": headers,
            }
        )
    emit(out, cases)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
