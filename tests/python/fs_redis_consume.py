"""Consume messages the Rust Redis transport wrote, with FastStream's own
RedisBroker subscriber (no custom parser or decoder), and print what
FastStream decoded.

    fs_redis_consume.py --url redis://127.0.0.1:6379 --kind stream|list|channel \
        --name KEY --count N [--timeout SECONDS]

stdout: one JSON document {"messages": [...], "timed_out": bool}; each message
has "body_b64" (msg.body, the raw body bytes), "decoded" (the handler's body
argument as FastStream decoded it by content type: JSON value, str, or
{"bytes_b64": ...}), "content_type", "correlation_id", "message_id" and
"headers" (msg.headers). Exit status 0, or 1 when fewer than N messages arrived
within the timeout. "ready" goes to stderr once the subscriber runs (for a
channel, the Rust side also waits for PUBSUB NUMSUB).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from typing import Any

from _interop_common import Collected, emit, take_stdout
from faststream.redis import ListSub, RedisBroker, StreamSub
from faststream.redis.annotations import RedisMessage


def jsonable(body: Any) -> Any:
    if isinstance(body, (bytes, bytearray)):
        return {"bytes_b64": base64.b64encode(bytes(body)).decode()}
    return body


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--kind", choices=["stream", "list", "channel"], required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args()
    out = take_stdout()

    broker = RedisBroker(args.url)
    got = Collected(args.count)

    if args.kind == "stream":
        sub = broker.subscriber(stream=StreamSub(args.name, last_id="0", polling_interval=50))
    elif args.kind == "list":
        sub = broker.subscriber(list=ListSub(args.name, polling_interval=0.05))
    else:
        sub = broker.subscriber(channel=args.name)

    @sub
    async def handle(body: Any, msg: RedisMessage) -> None:
        got.add(
            {
                "body_b64": base64.b64encode(bytes(msg.body)).decode(),
                "decoded": jsonable(body),
                "content_type": msg.content_type,
                "correlation_id": msg.correlation_id,
                "message_id": msg.message_id,
                "headers": {str(k): str(v) for k, v in msg.headers.items()},
            }
        )

    timed_out = not await got.consume(
        broker, args.timeout, ready=lambda: print("ready", file=sys.stderr, flush=True)
    )
    emit(out, {"messages": got.records, "timed_out": timed_out})
    return 1 if timed_out else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
