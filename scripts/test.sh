#!/usr/bin/env bash
# THE one command that runs every test of the workspace:
#
#   bash scripts/test.sh [extra args for cargo nextest run / cargo test]
#
# It prepares the services the tests need, then runs the tests:
#   * PostgreSQL: started if it does not answer, database of OUTBOX_TEST_DATABASE_URL
#     (default postgres://postgres@127.0.0.1:5432/outbox_test) created if missing;
#   * Kafka-protocol broker (Tansu, scripts/kafka.sh) started unless KAFKA_BOOTSTRAP
#     is already set; stopped again at exit only if this script started it;
#   * a second Kafka-protocol broker that implements transactions (noida-db,
#     scripts/noida.sh) for tests/tests/kafka_transactions.rs and
#     tests/tests/exactly_once.rs (the transactional relay), started unless
#     NOIDA_KAFKA_BOOTSTRAP is already set; stopped at exit likewise;
#   * Python venv with faststream-outbox 0.19 (scripts/python-env.sh) for the
#     interop tests.
#   * the official AsyncAPI parser (npm ci in tools/asyncapi, Node.js) and
#     Debian's chromium and chromedriver (packages chromium, chromium-driver;
#     installed with apt-get when missing and root) for tests/tests/asyncapi.rs
#     and the dashboard's browser tests.
#   * RabbitMQ, NATS (with JetStream) and Redis: the machine's servers, checked to
#     answer (RABBITMQ_URL, NATS_URL, REDIS_URL; defaults below); the tests never
#     stop them (outages go through an in-test TCP proxy). Fails loudly if one is down.
# Exported for the tests: OUTBOX_TEST_DATABASE_URL, KAFKA_BOOTSTRAP, NOIDA_KAFKA_BOOTSTRAP, OUTBOX_PYTHON,
# RABBITMQ_URL, NATS_URL, REDIS_URL
# (plus OUTBOX_KAFKA_SH = path of scripts/kafka.sh, for pause/resume fault tests).
#   * a private PostgreSQL with pg_stat_statements (scripts/bench-pg.sh, port 5433)
#     for the benchmark gate; stopped again at exit only if this script started it.
# Then: `cargo nextest run --workspace --all-features --no-fail-fast "$@"` (or
# `cargo test ...` without nextest), the examples (scripts/check-examples.sh), the
# doctests (`cargo test --doc`), and the benchmark gate (`outbox-bench check`:
# statements, round trips and tuples per scenario against bench/baseline.json;
# OUTBOX_SKIP_BENCH_GATE=1 skips it).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo python3 pg_isready psql createdb timeout

export OUTBOX_TEST_DATABASE_URL=${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_test}

ensure_postgres_db "$OUTBOX_TEST_DATABASE_URL"

# --- Kafka ----------------------------------------------------------------
KAFKA_SH=$REPO/scripts/kafka.sh
export OUTBOX_KAFKA_SH=$KAFKA_SH
started_kafka=0
started_noida=0
started_bench_pg=0
cleanup() {
  local rc=$?
  if [ "$started_kafka" = 1 ]; then bash "$KAFKA_SH" stop || log "kafka.sh stop failed"; fi
  if [ "$started_noida" = 1 ]; then bash "$REPO/scripts/noida.sh" stop || log "noida.sh stop failed"; fi
  if [ "$started_bench_pg" = 1 ]; then bash "$REPO/scripts/bench-pg.sh" stop || log "bench-pg.sh stop failed"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${KAFKA_BOOTSTRAP:-}" ]; then
  log "using the Kafka broker at KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
else
  if bash "$KAFKA_SH" status >/dev/null 2>&1; then
    log "Kafka broker already running (left running at exit)"
  else
    started_kafka=1
    bash "$KAFKA_SH" start || die "could not start the Kafka broker (scripts/kafka.sh start)"
  fi
  kafka_env=$(bash "$KAFKA_SH" env)
  export KAFKA_BOOTSTRAP=${kafka_env#KAFKA_BOOTSTRAP=}
fi

# --- noida-db: Kafka transactions (kafka_transactions.rs, exactly_once.rs) ----
# Tansu does not fence zombie producers nor hide aborted records; noida-db does.
NOIDA_SH=$REPO/scripts/noida.sh
if [ -n "${NOIDA_KAFKA_BOOTSTRAP:-}" ]; then
  log "using the transactional Kafka broker at NOIDA_KAFKA_BOOTSTRAP=$NOIDA_KAFKA_BOOTSTRAP"
else
  if bash "$NOIDA_SH" status >/dev/null 2>&1; then
    log "noida-db already running (left running at exit)"
  else
    started_noida=1
    bash "$NOIDA_SH" start || die "could not start noida-db, the transactional Kafka broker (scripts/noida.sh start)"
  fi
  noida_env=$(bash "$NOIDA_SH" env)
  export NOIDA_KAFKA_BOOTSTRAP=${noida_env#NOIDA_KAFKA_BOOTSTRAP=}
fi

# --- Python (interop tests) --------------------------------------------------
py_out=$(bash "$REPO/scripts/python-env.sh") || die "scripts/python-env.sh failed"
OUTBOX_PYTHON=$(tail -n 1 <<<"$py_out")
[ -x "$OUTBOX_PYTHON" ] || die "scripts/python-env.sh printed no usable python ($OUTBOX_PYTHON)"
export OUTBOX_PYTHON

# --- AsyncAPI checks (tests/tests/asyncapi.rs) -------------------------------
# The official parser, @asyncapi/parser, pinned in tools/asyncapi/package-lock.json
# (npm ci only when node_modules is missing or older than the lock: ~10 s cold),
# and Debian's chromium for the headless-browser test of `outbox docs serve`.
need node npm
asyncapi_dir=$REPO/tools/asyncapi
if [ ! "$asyncapi_dir/node_modules/.package-lock.json" -nt "$asyncapi_dir/package-lock.json" ]; then
  log "npm ci in tools/asyncapi (the official AsyncAPI parser)"
  (cd "$asyncapi_dir" && npm ci --no-audit --no-fund --loglevel=error) ||
    die "npm ci in tools/asyncapi failed (is the npm registry reachable?)"
fi
# Debian's chromedriver (package chromium-driver, /usr/bin/chromedriver) drives
# it over WebDriver for the dashboard's browser tests (tests/tests/dashboard_browser.rs).
if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromedriver ]; then
  command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] ||
    die "chromium or chromedriver not found: install them (Debian: apt-get install -y chromium chromium-driver) for the browser tests"
  log "installing chromium and chromium-driver (Debian packages) for the headless-browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } ||
    die "apt-get install chromium chromium-driver failed"
  command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ] ||
    die "apt-get installed chromium chromium-driver, yet chromium or /usr/bin/chromedriver is missing"
fi

# --- RabbitMQ, NATS, Redis (the machine's shared servers) --------------------
export RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
need_server RabbitMQ "$RABBITMQ_URL" "Start it (Debian: service rabbitmq-server start) or set RABBITMQ_URL."
need_server NATS "$NATS_URL" "Start nats-server with JetStream (-js) or set NATS_URL."
need_server Redis "$REDIS_URL" "Start it (Debian: service redis-server start) or set REDIS_URL."

log "OUTBOX_TEST_DATABASE_URL=$OUTBOX_TEST_DATABASE_URL"
log "RABBITMQ_URL=$RABBITMQ_URL NATS_URL=$NATS_URL REDIS_URL=$REDIS_URL"
log "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP NOIDA_KAFKA_BOOTSTRAP=$NOIDA_KAFKA_BOOTSTRAP"
log "OUTBOX_PYTHON=$OUTBOX_PYTHON"

# --- Tests ------------------------------------------------------------------
# The examples and the `outbox` binary, built here with the very command
# tests/tests/asyncapi.rs runs (it runs them): its own build is then a no-op.
# Built inside the test, they compiled every dependency again (examples
# resolve other features than the test targets) while the suite ran, and a
# failure there was hard to read; here it fails loudly, before the tests.
log "cargo build --workspace --all-features --examples --bin outbox"
cargo build --workspace --all-features --examples --bin outbox ||
  die "cargo build of the examples and the outbox binary failed (see above)"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run --workspace --all-features --no-fail-fast $*"
  cargo nextest run --workspace --all-features --no-fail-fast "$@" || status=$?
else
  log "cargo-nextest not found: cargo test --workspace --all-features --no-fail-fast $*"
  cargo test --workspace --all-features --no-fail-fast "$@" || status=$?
fi
# The examples, with their output checked.
DATABASE_URL=$OUTBOX_TEST_DATABASE_URL bash "$REPO/scripts/check-examples.sh" || status=$?
bash "$REPO/scripts/check-readme.sh" || status=$? # the README quickstart, as a crate of its own
# nextest does not run doctests (run them even when the tests above failed)
log "cargo test --workspace --doc --all-features"
cargo test --workspace --doc --all-features || { rc=$?; [ "$status" != 0 ] || status=$rc; }

# The benchmark gate: machine-independent figures only (never timings), on the
# private cluster (pg_stat_statements must be preloaded: a server restart).
if [ "${OUTBOX_SKIP_BENCH_GATE:-0}" = 1 ]; then
  log "OUTBOX_SKIP_BENCH_GATE=1: benchmark gate skipped"
else
  bash "$REPO/scripts/bench-pg.sh" status >/dev/null 2>&1 || started_bench_pg=1
  bench_url=$(bash "$REPO/scripts/bench-pg.sh" start) || die "could not start the benchmark PostgreSQL (scripts/bench-pg.sh start)"
  log "outbox-bench check --baseline bench/baseline.json ($bench_url)"
  cargo run -q -p outbox-bench -- --database-url "$bench_url" --wait-quiet-secs 0 --retries 0 \
    check --baseline "$REPO/bench/baseline.json" >/dev/null || {
    rc=$?
    log "the benchmark gate failed: see the 'check: FAIL' lines above"
    [ "$status" != 0 ] || status=$rc
  }
fi

if [ "$status" != 0 ]; then die "tests failed (exit $status)"; fi
log "all tests passed"
