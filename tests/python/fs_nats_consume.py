#!/usr/bin/env python3
"""Consume a JetStream-captured NATS subject with a real FastStream NatsBroker.

The interop helper of tests/tests/nats.rs: a FastStream ``NatsBroker``
subscriber on --subject, reading the existing stream --stream
(``JStream(name, declare=False)``, an ephemeral push consumer delivering from
the stream's start), decodes each message with FastStream's own parser
(``faststream.nats.parser.JsParser``: headers ``content-type``,
``correlation_id``, ``message_id``) and decoder, acks it, stops after
--expect messages (exit 0) or --timeout seconds (exit 1) and prints ONE JSON
list on stdout (see README.md beside this file): per message the raw body
(base64), the decoded body, content_type, correlation_id, message_id,
headers and subject.
"""

from __future__ import annotations

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
    from faststream.nats import DeliverPolicy, JStream, NatsBroker
    from faststream.nats.annotations import NatsMessage

    log = stderr_logger("fs_nats_consume", args.verbose)
    broker = NatsBroker(args.url, logger=log)
    got = Collected(args.expect)

    @broker.subscriber(
        args.subject,
        stream=JStream(name=args.stream, declare=False),
        deliver_policy=DeliverPolicy.ALL,
    )
    async def handle(msg: NatsMessage) -> None:
        decoded = await msg.decode()
        got.add(
            {
                "subject": msg.raw_message.subject,
                "payload_base64": b64(msg.body),
                "decoded_body": jsonable(decoded),
                "decoded_type": type(decoded).__name__,
                "content_type": msg.content_type,
                "correlation_id": msg.correlation_id,
                "message_id": msg.message_id,
                "headers": dict(msg.headers),
            }
        )
        log.debug("got %s (%d records)", msg.message_id, len(got.records))

    ok = await got.consume(broker, args.timeout, log)
    emit(out, got.records)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="nats://host:port")
    p.add_argument("--stream", required=True, help="the existing stream capturing --subject")
    p.add_argument("--subject", required=True)
    add_consume_args(p, timeout=60.0, expect="stop after N messages")
    return run_main(p, run)


if __name__ == "__main__":
    sys.exit(main())
