#!/usr/bin/env bash
# Runs every example and checks what it prints (called by scripts/test.sh with
# DATABASE_URL and, for the Kafka examples, KAFKA_BOOTSTRAP set; the RabbitMQ,
# NATS and Redis examples use RABBITMQ_URL, NATS_URL, REDIS_URL or their defaults).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
: "${DATABASE_URL:?DATABASE_URL must be set}"

# expect EXAMPLE PATTERN...: run the example, fail unless every pattern is in its output.
expect() {
  local example=$1 out
  shift
  log "example $example"
  out=$(timeout 300 cargo run -q -p examples --example "$example" 2>&1) ||
    { echo "$out" >&2; die "example $example failed"; }
  echo "$out" | sed "s/^/  [$example] /" >&2
  local p
  for p in "$@"; do
    grep -qE -- "$p" <<<"$out" || die "example $example: expected output matching '$p'"
  done
}

expect standalone_outbox \
  'published 3 orders \(and rolled one back\)' \
  'got order 1 \(1000 cents\)' 'got order 2 \(2000 cents\)' 'got order 3 \(3000 cents\)' \
  'handled 3 orders; 0 rows left in the outbox'
expect first_outbox_app \
  'published order 1' 'got order 1' 'the outbox is empty; stopping'

: "${KAFKA_BOOTSTRAP:?KAFKA_BOOTSTRAP must be set for the kafka_relay and ordered_relay examples}"
expect kafka_relay \
  'published order 1 \(outbox row [0-9]+\)' 'got order 1' 'got order 2' 'got order 3' \
  'rolled back order 99' \
  'key=\(none\) value=1 headers: content-type=application/json correlation_id=order-1-[0-9a-f]+ outbox-id=[0-9]+' \
  'relayed 3 of 3 orders to orders.kafka' '^0 rows left in the outbox'
# The consuming service of what kafka_relay relayed: new messages once, then
# (rewound, as a reset consumer group would) every one of them skipped.
INBOX_IDLE_EXIT_SECS=2 expect inbox_consumer \
  'consumed [0-9]+ records: [0-9]+ new, [0-9]+ already processed' \
  '^[0-9]+ invoices for orders.kafka, 0 duplicates$'
INBOX_IDLE_EXIT_SECS=2 INBOX_REWIND=1 expect inbox_consumer \
  'from the beginning' 'consumed [1-9][0-9]* records: 0 new, [1-9][0-9]* already processed' \
  '^[0-9]+ invoices for orders.kafka, 0 duplicates$'
expect ordered_relay \
  'publishing order-1 created \(outbox row [0-9]+\), its transaction open 300 ms' \
  'committed order-1 created' 'published order-1 paid \(outbox row [0-9]+\)' \
  'handled order-1 shipped' 'handled order-2 shipped' 'handled order-3 shipped' \
  '^  order-1 \(partition [0-9]+\): created -> paid -> shipped$' \
  '^  order-2 \(partition [0-9]+\): created -> paid -> shipped$' \
  '^  order-3 \(partition [0-9]+\): created -> paid -> shipped$' \
  'per-key order held for 3 of 3 orders' '^0 rows left in the outbox'
# The other buses: the machine's servers (RABBITMQ_URL, NATS_URL, REDIS_URL or
# their defaults, checked to answer by scripts/test.sh).
expect rabbitmq_relay \
  'published order 1 \(outbox row [0-9]+\)' 'got order 1' 'got order 2' 'got order 3' \
  'rolled back order 99' \
  'message_id=[0-9]+ correlation_id=order-1-[0-9a-f]+ content_type=application/json delivery_mode=2 body=1' \
  'relayed 3 of 3 orders to orders.rabbit' '^0 rows left in the outbox'
expect nats_relay \
  'published order 1 \(outbox row [0-9]+\)' 'got order 1' 'got order 2' 'got order 3' \
  'rolled back order 99' \
  'payload=1 headers: Nats-Msg-Id=[^ ]+ content-type=application/json correlation_id=order-1-[0-9a-f]+' \
  'relayed 3 of 3 orders to orders.created' '^0 rows left in the outbox'
expect redis_relay \
  'published order 1 \(outbox row [0-9]+\)' 'got order 1' 'got order 2' 'got order 3' \
  'rolled back order 99' \
  'body=1 headers: correlation_id=order-1-[0-9a-f]+ content-type=application/json outbox-id=[0-9]+ message_id=[0-9]+' \
  'relayed 3 of 3 orders to orders.redis' '^0 rows left in the outbox'
# The tutorial (docs/tutorial/): its code blocks against examples/tutorial/,
# its Cargo.toml as a crate of its own, its programs run.
bash "$REPO/scripts/check-tutorial.sh"
log "examples OK"
