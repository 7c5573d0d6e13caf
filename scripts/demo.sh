#!/usr/bin/env bash
# The main job, end to end: the outbox -> Kafka relay demo.
#
#   bash scripts/demo.sh
#
# Starts PostgreSQL if it is down and creates the demo database
# (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/outbox_demo), starts
# the local Kafka-protocol broker (scripts/kafka.sh) unless KAFKA_BOOTSTRAP
# points at a broker already, then runs `cargo run -p examples --example
# kafka_relay`: orders published in Postgres transactions are relayed to the
# topic `orders.kafka`, and what a Kafka consumer read back is printed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_demo}
ensure_postgres_db "$DATABASE_URL"

EXAMPLE=${OUTBOX_DEMO_EXAMPLE:-kafka_relay}
if [ "$EXAMPLE" = kafka_relay ]; then
  if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
    bash "$REPO/scripts/kafka.sh" start || die "could not start the local Kafka broker (scripts/kafka.sh start)"
    kafka_env=$(bash "$REPO/scripts/kafka.sh" env)
    export KAFKA_BOOTSTRAP=${kafka_env#KAFKA_BOOTSTRAP=}
    bash "$REPO/scripts/kafka.sh" topic orders.kafka 4 || die "could not create the topic orders.kafka"
    log "local Kafka broker on $KAFKA_BOOTSTRAP (left running; stop it with: bash scripts/kafka.sh stop)"
  else
    log "using the Kafka broker at KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
  fi
fi
exec cargo run -q -p examples --example "$EXAMPLE"
