#!/usr/bin/env bash
# faststream-outbox 0.19 (Python) vs outbox (Rust) on the SAME PostgreSQL server
# (the private benchmark cluster) with the same workloads, in one run; prints both
# figures and the ratio for: drain with per-row acks, drain with batched acks
# (ours with the lease claim and with the transaction-held claim, --claim
# transaction), produce (single and batch), idle latency. The lease vs
# transaction comparison with the relay, WAL and the broker ceiling:
# `bash scripts/bench.sh throughput`.
#
#   bash scripts/bench-compare.sh           # 3 repeats per point (~10-25 min)
#   bash scripts/bench-compare.sh --quick   # smaller workloads, a smoke test
#
# Environment: BENCH_BIN (a prebuilt outbox-bench instead of building one),
# BENCH_REPEATS (default 3), BENCH_OUT (JSON lines, default
# bench/results/compare-<UTC time>.jsonl), BENCH_PG_* (scripts/bench-pg.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=common.sh
. scripts/common.sh
need cargo python3

EXTRA=()
for a in "$@"; do
  case "$a" in
    --quick) EXTRA+=(--quick) ;;
    *) die "unknown argument '$a' (only --quick)" ;;
  esac
done
OUT=${BENCH_OUT:-$REPO/bench/results/compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl}

URL=$(bash scripts/bench-pg.sh start)
PY=$(bash scripts/python-env.sh | tail -n 1)
[ -x "$PY" ] || die "scripts/python-env.sh did not give a python ($PY)"
BIN=$(bench_binary "$OUT")
trap 'rm -f "$BIN"' EXIT

python3 bench/compare.py --rust "$BIN" --python "$PY" \
  --database-url "$URL" --repeats "${BENCH_REPEATS:-3}" --out "$OUT" "${EXTRA[@]}"
