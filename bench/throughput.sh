#!/usr/bin/env bash
# Issue 16's comparisons in one run: the lease claim vs the transaction-held
# claim (SubscriberOptions::claim_mode) side by side, each pair back to back in
# one invocation, REPEATS rounds interleaved (so drift hits both modes alike):
#
#   drain    batched drain, 100k backlog, 4 workers, 100 and 1,000 rows per
#            claim and per delete, lease vs transaction
#   python   faststream-outbox 0.19's batched drain (its best configuration,
#            w4 / fetch 100 / tfbs 100, 50k backlog) on the same server
#   relay    the Kafka relay as the README writes it (relay defaults,
#            outbox-kafka's = librdkafka's default producer settings, no linger
#            override), 100k backlog, lease vs transaction, after the broker's
#            own ingest ceiling with the same producer settings (relay --ceiling)
#   steady   the same relay with a producer at 5,000 msg/s for 8 s: WAL per
#            message with the producer's INSERTs inside the window (no split,
#            few full-page images: rows die within a checkpoint cycle)
#   latency  idle commit -> handler and commit -> Kafka delivery report
#            (1,000 single publishes 20 ms apart, default subscriber / route)
#   rss      peak RSS of the relay with a 1M-row backlog (first round only;
#            RSS_CLAIMS, default "transaction", the relay default)
#
# Every point reports WAL bytes per message split into the producer's INSERTs
# and the drain (wal_bytes_per_msg_produce / _drain / _total, wal_scope),
# full-page-image bytes, and dead tuples per message. About 11-12 min here
# (3 rounds; a round is about 3 min, the 1M-row relay about 1 min).
#
#   bash scripts/bench-pg.sh start; bash scripts/kafka.sh start
#   cargo build --release -p outbox-bench
#   BIN=target/release/outbox-bench PY=$(bash scripts/python-env.sh | tail -n 1) \
#     OUT=bench/results/<file>.jsonl bash bench/throughput.sh [groups]
#   python3 bench/throughput.py bench/results/<file>.jsonl      # the tables
#
# (`bash scripts/bench.sh throughput` does all of that.)
# groups: drain python relay steady latency rss (default: all; python is
# skipped without PY). Sizes (for smoke tests; the tables name what ran):
# DRAIN_BACKLOG 100000, PY_BACKLOG 50000, RELAY_BACKLOG 100000,
# RSS_BACKLOG 1000000, STEADY_RATE 5000, STEADY_SECS 8, SAMPLES 1000;
# WAIT_QUIET (s, default 1200), BENCH_ARGS (extra outbox-bench flags).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${BIN:-target/release/outbox-bench}
OUT=${OUT:?set OUT to the JSON-lines file to append to}
PY=${PY:-}
REPEATS=${REPEATS:-3}
RSS_CLAIMS=${RSS_CLAIMS:-transaction}
DRAIN_BACKLOG=${DRAIN_BACKLOG:-100000}
PY_BACKLOG=${PY_BACKLOG:-50000}
RELAY_BACKLOG=${RELAY_BACKLOG:-100000}
RSS_BACKLOG=${RSS_BACKLOG:-1000000}
STEADY_RATE=${STEADY_RATE:-5000}
STEADY_SECS=${STEADY_SECS:-8}
SAMPLES=${SAMPLES:-1000}
URL=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5433/outbox_bench}
export BENCH_DATABASE_URL=$URL
export KAFKA_BOOTSTRAP=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
GROUPS_WANTED=("$@")
[ ${#GROUPS_WANTED[@]} -gt 0 ] || GROUPS_WANTED=(drain python relay steady latency rss)
want() { local g; for g in "${GROUPS_WANTED[@]}"; do [ "$g" = "$1" ] && return 0; done; return 1; }
run() {
  echo "throughput.sh: outbox-bench $*" >&2
  # shellcheck disable=SC2086 # BENCH_ARGS: extra global flags, word-split on purpose
  "$BIN" --repeats 1 --wait-quiet-secs "${WAIT_QUIET:-1200}" ${BENCH_ARGS:-} "$@" >>"$OUT" \
    || echo "throughput.sh: some points of '$*' failed (see $OUT)" >&2
}
python_drain() {
  # compare.py's measurement (quiet machine first, a disturbed run re-run).
  echo "throughput.sh: faststream-outbox drain $*" >&2
  python3 "$HERE/throughput.py" --measure-python --python "$PY" --database-url "$URL" \
    --out "$OUT" --wait-quiet "${WAIT_QUIET:-1200}" -- drain "$@" \
    || echo "throughput.sh: the faststream-outbox point failed" >&2
}
if want python && [ -z "$PY" ]; then
  echo "throughput.sh: PY is not set (scripts/python-env.sh): no faststream-outbox points" >&2
fi

for r in $(seq 1 "$REPEATS"); do
  echo "throughput.sh: round $r of $REPEATS" >&2
  if want drain; then
    for b in 100 1000; do
      run drain --backlog "$DRAIN_BACKLOG" --workers 4 --fetch-batch-size "$b" --ack-batch "$b" \
        --claim lease,transaction
    done
  fi
  if want python && [ -n "$PY" ]; then
    python_drain --backlog "$PY_BACKLOG" --workers 4 --fetch-batch-size 100 --tfbs 100
  fi
  if want relay; then
    run relay --backlog "$RELAY_BACKLOG" --readme-defaults --claim lease,transaction \
      --ceiling --ceiling-messages "$RELAY_BACKLOG" --ceiling-in-flight 10000
  fi
  if want steady; then
    run relay --rate "$STEADY_RATE" --duration-secs "$STEADY_SECS" --readme-defaults --claim lease,transaction
  fi
  if want latency; then
    run latency --samples "$SAMPLES" --claim lease,transaction
    run latency --samples "$SAMPLES" --kafka --claim lease,transaction
  fi
  if want rss && [ "$r" = 1 ]; then
    run relay --backlog "$RSS_BACKLOG" --readme-defaults --claim "$RSS_CLAIMS"
  fi
done
