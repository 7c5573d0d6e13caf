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
#   * Python venv with faststream-outbox 0.19 (scripts/python-env.sh) for the
#     interop tests.
# Exported for the tests: OUTBOX_TEST_DATABASE_URL, KAFKA_BOOTSTRAP, OUTBOX_PYTHON
# (plus OUTBOX_KAFKA_SH = path of scripts/kafka.sh, for pause/resume fault tests).
# Then: `cargo nextest run --workspace --all-features --no-fail-fast "$@"` (or
# `cargo test ...` without nextest), then the doctests (`cargo test --doc`).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

log() { echo "test.sh: $*" >&2; }
die() { echo "test.sh: ERROR: $*" >&2; exit 1; }
need() {
  local t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"; done
}
need cargo python3 pg_isready psql createdb timeout

export OUTBOX_TEST_DATABASE_URL=${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_test}

# --- PostgreSQL -------------------------------------------------------------
# Split the URL (user, password, host, port, database) for the libpq tools.
url_parts=$(python3 - "$OUTBOX_TEST_DATABASE_URL" <<'EOF'
import sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
if u.scheme not in ("postgres", "postgresql"):
    sys.exit(f"OUTBOX_TEST_DATABASE_URL must be postgres://..., got scheme {u.scheme!r}")
db = unquote(u.path.lstrip("/"))
if not db:
    sys.exit("OUTBOX_TEST_DATABASE_URL has no database name")
for v in (unquote(u.username or "postgres"), unquote(u.password or ""),
          u.hostname or "127.0.0.1", str(u.port or 5432), db):
    if "\n" in v:
        sys.exit("newline in OUTBOX_TEST_DATABASE_URL")
    print(v)
EOF
) || die "cannot parse OUTBOX_TEST_DATABASE_URL=$OUTBOX_TEST_DATABASE_URL"
{ read -r PG_USER; read -r PG_PASS; read -r PG_HOST; read -r PG_PORT; read -r PG_DB; } <<<"$url_parts"
if [ -n "$PG_PASS" ]; then export PGPASSWORD=$PG_PASS; fi
PG=(-h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")

if ! timeout 10 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
  case "$PG_HOST" in
    127.0.0.1 | localhost | ::1) ;;
    *) die "PostgreSQL at $PG_HOST:$PG_PORT does not answer (not local: not starting it)" ;;
  esac
  need pg_ctlcluster
  [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql)" ] ||
    die "PostgreSQL does not answer on $PG_HOST:$PG_PORT and no cluster under /etc/postgresql"
  for ver in $(ls /etc/postgresql); do
    log "starting PostgreSQL $ver/main"
    timeout 120 pg_ctlcluster --skip-systemctl-redirect "$ver" main start >&2 ||
      log "pg_ctlcluster $ver main start failed (may already be running)"
  done
  deadline=$((SECONDS + 60))
  until timeout 10 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; do
    [ $SECONDS -lt $deadline ] || die "PostgreSQL not ready on $PG_HOST:$PG_PORT after 60 s"
    sleep 0.5
  done
  log "PostgreSQL is ready on $PG_HOST:$PG_PORT"
fi

# (SQL on stdin: psql interpolates :'db' there, not in -c)
db_exists=$(echo "SELECT 1 FROM pg_database WHERE datname = :'db'" |
  timeout 30 psql "${PG[@]}" -d postgres -XAtq -v ON_ERROR_STOP=1 -v db="$PG_DB") ||
  die "cannot query PostgreSQL at $PG_HOST:$PG_PORT as $PG_USER"
if [ "$db_exists" != 1 ]; then
  log "creating database $PG_DB"
  timeout 60 createdb "${PG[@]}" "$PG_DB" || die "createdb $PG_DB failed"
fi

# --- Kafka ----------------------------------------------------------------
KAFKA_SH=$REPO/scripts/kafka.sh
export OUTBOX_KAFKA_SH=$KAFKA_SH
started_kafka=0
cleanup() {
  local rc=$?
  if [ "$started_kafka" = 1 ]; then bash "$KAFKA_SH" stop || log "kafka.sh stop failed"; fi
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

# --- Python (interop tests) --------------------------------------------------
py_out=$(bash "$REPO/scripts/python-env.sh") || die "scripts/python-env.sh failed"
OUTBOX_PYTHON=$(tail -n 1 <<<"$py_out")
[ -x "$OUTBOX_PYTHON" ] || die "scripts/python-env.sh printed no usable python ($OUTBOX_PYTHON)"
export OUTBOX_PYTHON

log "OUTBOX_TEST_DATABASE_URL=$OUTBOX_TEST_DATABASE_URL"
log "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
log "OUTBOX_PYTHON=$OUTBOX_PYTHON"

# --- Tests ------------------------------------------------------------------
status=0
if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run --workspace --all-features --no-fail-fast $*"
  cargo nextest run --workspace --all-features --no-fail-fast "$@" || status=$?
else
  log "cargo-nextest not found: cargo test --workspace --all-features --no-fail-fast $*"
  cargo test --workspace --all-features --no-fail-fast "$@" || status=$?
fi
# nextest does not run doctests (run them even when the tests above failed)
log "cargo test --workspace --doc --all-features"
cargo test --workspace --doc --all-features || { rc=$?; [ "$status" != 0 ] || status=$rc; }

if [ "$status" != 0 ]; then die "tests failed (exit $status)"; fi
log "all tests passed"
