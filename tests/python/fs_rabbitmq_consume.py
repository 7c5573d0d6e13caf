#!/usr/bin/env python3
"""Consume what the Rust RabbitMQ transport published, with a real FastStream RabbitBroker.

Subscribes to --queue (an existing queue: declare=False) on --url, acks every
message, stops after --expect messages (exit 0) or --timeout seconds (exit 1),
and prints ONE JSON list on stdout, one object per message, exactly as
FastStream's RabbitMessage gives it:

  body_base64     msg.body (the raw bytes)
  decoded         await msg.decode() (FastStream's content-type driven decoding;
                  bytes become {"base64": ...})
  content_type    msg.content_type
  correlation_id  msg.correlation_id
  message_id      msg.message_id
  headers         msg.headers (values as FastStream/aio-pika decoded them)
  routing_key     msg.raw_message.routing_key
  exchange        msg.raw_message.exchange
  delivery_mode   int(msg.raw_message.delivery_mode)
"""


import argparse
import asyncio
import sys
from typing import Any

sys.dont_write_bytecode = True  # keep tests/python/ free of __pycache__

from _interop_common import b64, emit, jsonable, stderr_logger, take_stdout  # noqa: E402


async def run(args: argparse.Namespace, out: Any) -> int:
    from faststream.rabbit import RabbitBroker, RabbitQueue
    from faststream.rabbit.annotations import RabbitMessage

    log = stderr_logger("fs_rabbitmq_consume", args.verbose)
    broker = RabbitBroker(args.url, logger=log)
    records: list[dict[str, Any]] = []
    done = asyncio.Event()

    @broker.subscriber(RabbitQueue(args.queue, declare=False))
    async def handle(body: Any, msg: RabbitMessage) -> None:
        decoded = await msg.decode()
        raw = msg.raw_message
        records.append(
            {
                "body_base64": b64(msg.body),
                "decoded": jsonable(decoded),
                "handler_body": jsonable(body),
                "content_type": msg.content_type,
                "correlation_id": msg.correlation_id,
                "message_id": msg.message_id,
                "headers": jsonable(dict(msg.headers)),
                "routing_key": raw.routing_key,
                "exchange": raw.exchange,
                "delivery_mode": int(raw.delivery_mode),
            }
        )
        if len(records) >= args.expect:
            done.set()

    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=args.timeout)
        code = 0
    except asyncio.TimeoutError:
        code = 1
    finally:
        await broker.stop()
    emit(out, records)
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="amqp://user:password@host:5672/%%2f")
    p.add_argument("--queue", required=True, help="an existing queue")
    p.add_argument("--expect", type=int, required=True, help="messages to wait for")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    out = take_stdout()
    return asyncio.run(run(args, out))


if __name__ == "__main__":
    sys.exit(main())
