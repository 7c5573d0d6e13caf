#!/usr/bin/env bash
# The main job, end to end: the outbox -> bus relay demo.
#
#   bash scripts/demo.sh            # Kafka (the default)
#   bash scripts/demo.sh rabbitmq   # or: nats, redis
#
# Starts PostgreSQL if it is down and creates the demo database
# (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/outbox_demo), then
# runs the bus's relay example (`cargo run -p examples --example <bus>_relay`):
# orders published in Postgres transactions are relayed to the bus, and what a
# plain client of that bus read back is printed.
#   kafka:    starts the local Kafka-protocol broker (scripts/kafka.sh) unless
#             KAFKA_BOOTSTRAP points at a broker already; topic orders.kafka.
#   rabbitmq: RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2f).
#   nats:     NATS_URL (default nats://127.0.0.1:4222), JetStream enabled.
#   redis:    REDIS_URL (default redis://127.0.0.1:6379).
# RabbitMQ, NATS and Redis must already run; the script checks that they answer.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo

BUS=${1:-kafka}
case "$BUS" in
  kafka | rabbitmq | nats | redis) ;;
  rabbit) BUS=rabbitmq ;;
  -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
  *) die "unknown bus '$BUS': use kafka (default), rabbitmq, nats or redis" ;;
esac

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_demo}
ensure_postgres_db "$DATABASE_URL"

case "$BUS" in
  kafka)
    if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
      bash "$REPO/scripts/kafka.sh" start || die "could not start the local Kafka broker (scripts/kafka.sh start)"
      kafka_env=$(bash "$REPO/scripts/kafka.sh" env)
      export KAFKA_BOOTSTRAP=${kafka_env#KAFKA_BOOTSTRAP=}
      bash "$REPO/scripts/kafka.sh" topic orders.kafka 4 || die "could not create the topic orders.kafka"
      log "local Kafka broker on $KAFKA_BOOTSTRAP (left running; stop it with: bash scripts/kafka.sh stop)"
    else
      log "using the Kafka broker at KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
    fi
    ;;
  rabbitmq)
    export RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
    need_server RabbitMQ "$RABBITMQ_URL" "Start it (Debian: service rabbitmq-server start) or set RABBITMQ_URL."
    ;;
  nats)
    export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
    need_server NATS "$NATS_URL" "Start nats-server with JetStream (nats-server -js) or set NATS_URL."
    ;;
  redis)
    export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
    need_server Redis "$REDIS_URL" "Start it (Debian: service redis-server start) or set REDIS_URL."
    ;;
esac
exec cargo run -q -p examples --example "${OUTBOX_DEMO_EXAMPLE:-${BUS}_relay}"
