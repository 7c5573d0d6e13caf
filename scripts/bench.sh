#!/usr/bin/env bash
# The outbox benchmark suite (Rust side): every scenario of outbox-bench on the
# private PostgreSQL cluster, 3 repeats per point, then a median [min-max] table.
#
#   bash scripts/bench.sh                 # the whole suite (~40-60 min on 2 cores)
#   bash scripts/bench.sh drain produce   # only these groups: produce drain relay latency buses
#   bash scripts/bench.sh buses           # RabbitMQ, NATS, Redis: each bus's plain-client
#                                         # ceiling, the relay and commit->confirm latency
#   bash scripts/bench.sh ordering        # ordered vs unordered drains, relays, latency, the
#                                         # key's insert cost, a long transaction, a poisoned
#                                         # key (bench/ordering.sh; not part of the default set)
#   bash scripts/bench.sh throughput      # issue 16: lease vs transaction claim in one run
#                                         # (drains at 100 / 1,000 rows per claim, vs
#                                         # faststream-outbox 0.19, Kafka relay vs the broker's
#                                         # ceiling, WAL and dead tuples per message, idle
#                                         # latency, RSS at 1M rows), then the tables with
#                                         # ratios and targets (bench/throughput.sh, ~12 min;
#                                         # not part of the default set)
#   bash scripts/bench.sh overview        # the dashboard's capped overview() vs the exact stats()
#                                         # on 1M rows (outbox-bench overview; not part of the
#                                         # default set)
#
# Environment:
#   BENCH_BIN       use this prebuilt outbox-bench instead of building one
#   BENCH_REPEATS   repeats per point (default 3; for ordering / throughput: rounds)
#   BENCH_OUT       JSON-lines output (default bench/results/bench-<UTC time>.jsonl)
#   KAFKA_BOOTSTRAP Kafka for relay / latency-kafka (default: the local broker,
#                   started with scripts/kafka.sh if it is down; never stopped)
#   RABBITMQ_URL, NATS_URL, REDIS_URL  the buses (defaults: the machine's servers)
#   BENCH_PG_*      see scripts/bench-pg.sh
#
# Every point waits for a quiet machine first (no rustc, < 0.35 cores busy) and is
# re-run when a compile or another process disturbed it (outbox-bench does this).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=common.sh
. scripts/common.sh
need cargo python3

REPEATS=${BENCH_REPEATS:-3}
OUT=${BENCH_OUT:-$REPO/bench/results/bench-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$OUT")"
GROUPS_WANTED=("$@")
[ ${#GROUPS_WANTED[@]} -gt 0 ] || GROUPS_WANTED=(produce drain latency relay)
for g in "${GROUPS_WANTED[@]}"; do
  case "$g" in produce | drain | relay | latency | buses | ordering | throughput | overview) ;; *) die "unknown group '$g' (produce drain relay latency buses ordering throughput overview)" ;; esac
done
want() { local g; for g in "${GROUPS_WANTED[@]}"; do [ "$g" = "$1" ] && return 0; done; return 1; }

URL=$(bash scripts/bench-pg.sh start)
export BENCH_DATABASE_URL=$URL
BIN=$(bench_binary "$OUT")
trap 'rm -f "$BIN"' EXIT

if want relay || want latency || want ordering || want throughput; then
  if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
    bash scripts/kafka.sh start >&2 || die "could not start the local Kafka broker (scripts/kafka.sh start)"
    export KAFKA_BOOTSTRAP=127.0.0.1:9092
  fi
fi

run() {
  log "outbox-bench $*"
  # A failed point is reported in the JSON and on stderr; the suite goes on.
  "$BIN" --repeats "$REPEATS" "$@" >>"$OUT" || log "some points of '$*' failed (see $OUT)"
}

log "results -> $OUT"
if want produce; then
  run produce --mode single,autocommit --concurrency 1,4 --messages 10000
  run produce --mode batch --batch-size 100 --concurrency 1,2,4 --messages 300000
  run produce --mode batch --batch-size 1000 --concurrency 1,2 --messages 1000000
fi
if want drain; then
  # Backlog sizes: per-row and batched acks, 1 and 4 workers.
  run drain --backlog 10000,100000,1000000 --ack-batch 1,1000 --workers 1,4 --fetch-batch-size 1000
  # Workers sweep and the Python harness' own configurations.
  run drain --backlog 100000 --ack-batch 1,1000 --workers 2,8 --fetch-batch-size 1000
  run drain --backlog 100000 --ack-batch 1,100 --workers 1,4 --fetch-batch-size 100
fi
if want latency; then
  run latency --samples 1000
  run latency --samples 1000 --kafka
  run latency --samples 1000 --kafka --linger-ms 0
fi
if want relay; then
  # The README relay (no knobs: the relay defaults), then tuned points.
  run relay --backlog 100000 --readme-defaults
  run relay --backlog 100000 --workers 16,64,90 --fetch-batch-size 1000 --ack-batch 100
  run relay --backlog 100000 --workers 90 --fetch-batch-size 1000 --ack-batch 100 --linger-ms 0,1
  run relay --backlog 1000000 --workers 90 --fetch-batch-size 1000 --ack-batch 100 --linger-ms 1
  run relay --rate 5000,10000,15000 --workers 90 --linger-ms 1 --duration-secs 20
fi
if want buses; then
  # Per bus, in one run: the plain client's confirmed-publish ceiling (256 in
  # flight, as the relay's 256 workers), the README relay (relay defaults), the
  # ceiling again (the machine drifts), then idle commit -> confirm latency.
  # The outbox side's own ceiling for the same route: a transport that
  # confirms at once (outbox-core's MemoryTransport).
  run relay --bus memory --backlog 50000 --readme-defaults
  for bus in rabbitmq nats redis; do
    run ceiling --bus "$bus" --messages 50000 --in-flight 256
    run relay --bus "$bus" --backlog 50000 --readme-defaults
    run ceiling --bus "$bus" --messages 50000 --in-flight 256
    run latency --bus "$bus" --samples 1000
  done
  python3 bench/buses.py "$OUT"
fi
if want ordering; then
  # Its own rounds (ordered and unordered in each invocation, interleaved).
  BIN=$BIN OUT=$OUT REPEATS=$REPEATS bash bench/ordering.sh
  python3 bench/ordering.py "$OUT"
fi
if want overview; then
  # One JSON object: p50/p95/p99 of each and their ratio (docs/performance.md).
  run overview --backlog 1000000 --runs 100
fi
if want throughput; then
  # faststream-outbox 0.19 for the side-by-side drain (its venv; skipped if it
  # cannot be made).
  PY=$(bash scripts/python-env.sh | tail -n 1) || PY=
  [ -x "$PY" ] || { log "no faststream-outbox venv (scripts/python-env.sh): its points are skipped"; PY=; }
  BIN=$BIN OUT=$OUT REPEATS=$REPEATS PY=$PY bash bench/throughput.sh
  python3 bench/throughput.py "$OUT" --markdown-out "${OUT%.jsonl}.md"
  log "tables: ${OUT%.jsonl}.md"
  # Only the claim-mode tables for this group (summarize.py reads every scenario).
  if [ ${#GROUPS_WANTED[@]} -eq 1 ]; then log "raw results: $OUT"; exit 0; fi
fi
python3 bench/summarize.py "$OUT"
log "raw results: $OUT"
