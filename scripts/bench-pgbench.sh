#!/usr/bin/env bash
# The batch-publish ceiling on THIS machine: pgbench inserting 100-row
# multi-VALUES statements (literal rows: ~100 B bytea payload, ~100 B JSONB
# headers, as in the research baseline) into an outbox-shaped table with its
# pending partial index, one durable COMMIT per statement. Prints one JSON
# object per run: {"clients": N, "rows_per_sec": R}. Compare with
# `outbox-bench produce --batch 100` on the same server (docs/performance.md).
#
#   bash scripts/bench-pgbench.sh              # 1 client, 3 runs of 8 s
#   BENCH_CLIENTS=2 bash scripts/bench-pgbench.sh
#
# Environment: BENCH_CLIENTS (1), BENCH_RUNS (3), BENCH_SECONDS (8),
# BENCH_PG_* (scripts/bench-pg.sh). Uses the private benchmark cluster.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=common.sh
. scripts/common.sh
need pgbench psql python3

CLIENTS=${BENCH_CLIENTS:-1}
RUNS=${BENCH_RUNS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-8}
for v in "$CLIENTS" "$RUNS" "$SECONDS_PER_RUN"; do
  case "$v" in '' | *[!0-9]* | 0) die "BENCH_CLIENTS, BENCH_RUNS and BENCH_SECONDS must be positive numbers" ;; esac
done

URL=$(bash scripts/bench-pg.sh start)
TABLE=pgbench_outbox_ceiling
SCRIPT=$(mktemp)
trap 'rm -f "$SCRIPT"' EXIT

psql -X -q -v ON_ERROR_STOP=1 "$URL" <<SQL
SET client_min_messages = warning;
DROP TABLE IF EXISTS $TABLE;
CREATE TABLE $TABLE (
  id bigserial PRIMARY KEY, queue text NOT NULL, payload bytea, headers jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  next_attempt_at timestamptz NOT NULL DEFAULT now(),
  acquired_token uuid, acquired_at timestamptz, deliveries_count int NOT NULL DEFAULT 0);
CREATE INDEX ${TABLE}_pending_idx ON $TABLE (queue, next_attempt_at, id)
  WHERE acquired_token IS NULL;
SQL

python3 - "$TABLE" >"$SCRIPT" <<'EOF'
import sys
payload = "'\\x" + "ab" * 100 + "'::bytea"
headers = ("'{\"content-type\": \"application/json\", "
           "\"correlation_id\": \"0b6f3c2e-8d3f-4a63-9f0e-4f1f6c8b7a21\"}'::jsonb")
rows = ", ".join(f"('orders', {payload}, {headers})" for _ in range(100))
print(f"INSERT INTO {sys.argv[1]} (queue, payload, headers) VALUES {rows};")
EOF

jobs=$((CLIENTS < 2 ? CLIENTS : 2))
for _ in $(seq "$RUNS"); do
  psql -X -q -v ON_ERROR_STOP=1 "$URL" -c "TRUNCATE $TABLE" -c "VACUUM ANALYZE $TABLE" -c "CHECKPOINT"
  out=$(pgbench -n -M prepared -T "$SECONDS_PER_RUN" -c "$CLIENTS" -j "$jobs" -f "$SCRIPT" "$URL" 2>&1) ||
    die "pgbench failed: $out"
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out")
  [ -n "$tps" ] || die "no tps in pgbench's output: $out"
  python3 -c "import json,sys; print(json.dumps({'clients': int(sys.argv[1]), 'rows_per_sec': round(float(sys.argv[2]) * 100)}))" "$CLIENTS" "$tps"
done
psql -X -q "$URL" -c "DROP TABLE $TABLE"
