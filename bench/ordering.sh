#!/usr/bin/env bash
# Ordered delivery (issue 15): every figure of docs/performance.md "Ordered
# delivery", ordered and unordered in the same invocation, repeated REPEATS
# times with the invocations interleaved (so drift hits both sides alike).
#
#   bash scripts/bench-pg.sh start; bash scripts/kafka.sh start
#   cargo build --release -p outbox-bench
#   BIN=target/release/outbox-bench OUT=bench/results/<file>.jsonl bash bench/ordering.sh [groups]
#   python3 bench/ordering.py <file>.jsonl          # the tables
#
# groups: drain relay latency produce longtx poison (default: all)
set -euo pipefail
BIN=${BIN:-target/release/outbox-bench}
OUT=${OUT:?set OUT to the JSON-lines file to append to}
REPEATS=${REPEATS:-3}
export KAFKA_BOOTSTRAP=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
GROUPS_WANTED=("$@")
[ ${#GROUPS_WANTED[@]} -gt 0 ] || GROUPS_WANTED=(drain relay latency produce longtx poison)
want() { local g; for g in "${GROUPS_WANTED[@]}"; do [ "$g" = "$1" ] && return 0; done; return 1; }
run() {
  echo "ordering.sh: outbox-bench $*" >&2
  "$BIN" --repeats 1 --wait-quiet-secs "${WAIT_QUIET:-1200}" "$@" >>"$OUT" || echo "ordering.sh: some points of '$*' failed (see $OUT)" >&2
}
for r in $(seq 1 "$REPEATS"); do
  echo "ordering.sh: round $r of $REPEATS" >&2
  if want drain; then
    # The batched drain of the performance page (4 workers, fetch 1000, acks
    # held to 1000), unordered then ordered on the same keyed backlog.
    run drain --backlog 100000 --workers 4 --fetch-batch-size 1000 --ack-batch 1000 \
      --order unordered,ordered --keys 10,1000,100000
  fi
  if want relay; then
    # The tuned Kafka relay (90 workers, fetch 1000, ack batch 100, linger 1 ms);
    # the ordering key is the record key.
    run relay --backlog 100000 --workers 90 --fetch-batch-size 1000 --ack-batch 100 --linger-ms 1 \
      --order unordered,ordered --keys 10,1000,100000
  fi
  if want latency; then
    # Idle: unordered keyless publishes vs ordered subscribers with keyed
    # publishes (PublishOptions::key over 1,000 keys: the key lock is taken).
    run latency --samples 1000 --order unordered,ordered
    run latency --samples 1000 --kafka --order unordered,ordered
  fi
  if want produce; then
    # Insert overhead: keyless/keyed rows x with/without <t>_key_idx.
    run produce --mode single --concurrency 1,4 --messages 10000 --keys 0,1000 --key-index keep,drop
    run produce --mode batch --batch-size 100 --concurrency 1 --messages 300000 --keys 0,1000 --key-index keep,drop
  fi
  if want longtx; then
    # A long transaction in another session from before the prefill to the end.
    run drain --backlog 100000 --workers 4 --fetch-batch-size 1000 --ack-batch 1000 \
      --order unordered,ordered --keys 1000 --hold none,snapshot,xid
  fi
  if want poison; then
    # Key k0's handler always fails (Block policy, retried every 10 ms).
    run drain --backlog 100000 --workers 4 --fetch-batch-size 1000 --ack-batch 1000 \
      --order ordered --keys 1000 --poison off,block
  fi
done
