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
import sys
from typing import Any

sys.dont_write_bytecode = True  # keep tests/python/ free of __pycache__

from _interop_common import (  # noqa: E402
    Collected,
    add_consume_args,
    b64,
    emit,
    jsonable,
    run_main,
    stderr_logger,
)


async def run(args: argparse.Namespace, out: Any) -> int:
    from faststream.rabbit import RabbitBroker, RabbitQueue
    from faststream.rabbit.annotations import RabbitMessage

    log = stderr_logger("fs_rabbitmq_consume", args.verbose)
    broker = RabbitBroker(args.url, logger=log)
    got = Collected(args.expect)

    @broker.subscriber(RabbitQueue(args.queue, declare=False))
    async def handle(body: Any, msg: RabbitMessage) -> None:
        decoded = await msg.decode()
        raw = msg.raw_message
        got.add(
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

    ok = await got.consume(broker, args.timeout, log)
    emit(out, got.records)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="amqp://user:password@host:5672/%%2f")
    p.add_argument("--queue", required=True, help="an existing queue")
    add_consume_args(p, timeout=30.0, expect="messages to wait for")
    return run_main(p, run)


if __name__ == "__main__":
    sys.exit(main())
