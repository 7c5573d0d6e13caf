#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for the benchmarks (outbox-bench, bench-compare.sh).
#
#   bash scripts/bench-pg.sh start    # initdb if needed, start, wait until ready; prints the URL
#   bash scripts/bench-pg.sh stop     # fast shutdown (only this cluster)
#   bash scripts/bench-pg.sh status   # "up <url>" / "down" (exit 1 unless up)
#   bash scripts/bench-pg.sh url      # prints postgres://postgres@127.0.0.1:PORT/outbox_bench
#
# Why a private cluster: the benchmarks count statements with pg_stat_statements,
# which must be in shared_preload_libraries (a restart), and they must not share
# the server with other engineers' tests (noise both ways).
#
# Settings: the same as the shared server on :5432 (shared_buffers 128MB,
# max_connections 100, fsync on, synchronous_commit on, wal_level replica,
# max_wal_size 1GB, min_wal_size 80MB, autovacuum off (as its conf.d/90-ci.conf),
# stock defaults otherwise), plus pg_stat_statements (track=all) and with
# ssl OFF (the shared server has ssl=on; clients there negotiate TLS unless
# sslmode=disable, which adds ~20-35 us per round trip: docs/performance.md).
# Listens on 127.0.0.1 only, trust auth, unix socket inside the data directory.
#
# Environment:
#   BENCH_PG_DIR    base directory (default /tmp/outbox-bench-pg); data in $BENCH_PG_DIR/data
#   BENCH_PG_PORT   port (default 5433)
#   BENCH_PG_BIN    PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   BENCH_PG_DB     database name in the printed URL (default outbox_bench)
#
# Idempotent: start on a running cluster only prints the URL; stop on a stopped one
# does nothing. Every step runs under `timeout`. As root, initdb/pg_ctl run as the
# `postgres` user (initdb refuses root) and the directory is owned by it.
set -euo pipefail

BASE=${BENCH_PG_DIR:-/tmp/outbox-bench-pg}
PORT=${BENCH_PG_PORT:-5433}
BIN=${BENCH_PG_BIN:-/usr/lib/postgresql/15/bin}
DBNAME=${BENCH_PG_DB:-outbox_bench}
DATA=$BASE/data
LOGFILE=$BASE/postgres.log
URL="postgres://postgres@127.0.0.1:$PORT/$DBNAME"

log() { echo "bench-pg.sh: $*" >&2; }
die() { echo "bench-pg.sh: ERROR: $*" >&2; exit 1; }

case "$PORT" in
  '' | *[!0-9]*) die "BENCH_PG_PORT must be a number, got '$PORT'" ;;
esac
case "$BASE" in
  /*) ;;
  *) die "BENCH_PG_DIR must be an absolute path, got '$BASE'" ;;
esac
for t in initdb pg_ctl pg_isready; do
  [ -x "$BIN/$t" ] || die "$BIN/$t not found (PostgreSQL 15 server binaries; set BENCH_PG_BIN)"
done
command -v timeout >/dev/null 2>&1 || die "'timeout' not found"

# Run a command as the cluster owner: `postgres` when we are root, else ourselves.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to own the cluster"
  command -v runuser >/dev/null 2>&1 || die "'runuser' (util-linux) not found"
  as_owner() { runuser -u postgres -- "$@"; }
  OWNER=postgres
else
  as_owner() { "$@"; }
  OWNER=$(id -un)
fi

ready() { timeout 5 "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -d postgres -U postgres; }

# Is the server on $PORT ours (its data directory is $DATA)?
ours() {
  local pidfile=$DATA/postmaster.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(head -n 1 "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # line 4 of postmaster.pid is the port
  [ "$(sed -n 4p "$pidfile" 2>/dev/null | tr -d ' ')" = "$PORT" ]
}

init() {
  [ -f "$DATA/PG_VERSION" ] && return 0
  log "initdb in $DATA (owner $OWNER)"
  mkdir -p "$BASE"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$BASE"; fi
  chmod 0755 "$BASE"
  # Never delete a directory we did not make: a non-empty one without PG_VERSION
  # (an interrupted initdb, or a wrong BENCH_PG_DIR) is for the user to look at.
  if [ -d "$DATA" ] && [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
    die "$DATA exists, is not empty and holds no cluster (an interrupted initdb?); remove it or set BENCH_PG_DIR"
  fi
  as_owner timeout 120 "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 \
      --locale=C.UTF-8 >"$BASE/initdb.log" 2>&1 ||
    die "initdb failed, see $BASE/initdb.log: $(tail -n 5 "$BASE/initdb.log" 2>/dev/null)"
  as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# --- outbox bench (scripts/bench-pg.sh): the shared :5432 server's settings ---
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DATA'
max_connections = 100
shared_buffers = 128MB
max_wal_size = 1GB
min_wal_size = 80MB
fsync = on
synchronous_commit = on
wal_level = replica
full_page_writes = on
autovacuum = off
ssl = off
timezone = 'Etc/UTC'
log_timezone = 'Etc/UTC'
# --- and what the benchmarks need ---
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
pg_stat_statements.track_utility = on
pg_stat_statements.max = 10000
EOF
}

start() {
  if ready; then
    if ours; then
      echo "$URL"
      return 0
    fi
    die "something else already listens on 127.0.0.1:$PORT (not the cluster in $DATA); set BENCH_PG_PORT"
  fi
  init
  log "starting PostgreSQL on 127.0.0.1:$PORT (log: $LOGFILE)"
  if [ "$(id -u)" = 0 ]; then touch "$LOGFILE" && chown postgres: "$LOGFILE"; fi
  as_owner timeout 90 "$BIN/pg_ctl" -D "$DATA" -l "$LOGFILE" -w -t 60 start >/dev/null ||
    die "pg_ctl start failed; last log lines: $(tail -n 10 "$LOGFILE" 2>/dev/null)"
  local deadline=$((SECONDS + 60))
  until ready; do
    [ $SECONDS -lt $deadline ] || die "not ready on 127.0.0.1:$PORT after 60 s; see $LOGFILE"
    sleep 0.2
  done
  # The benchmark database and the extension (idempotent).
  command -v psql >/dev/null 2>&1 || die "'psql' not found"
  local exists
  exists=$(echo "SELECT 1 FROM pg_database WHERE datname = :'db'" |
    timeout 30 psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -v db="$DBNAME") ||
    die "cannot query the new cluster"
  if [ "$exists" != 1 ]; then
    timeout 30 psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 \
      -c "CREATE DATABASE \"$DBNAME\"" >/dev/null || die "CREATE DATABASE $DBNAME failed"
  fi
  timeout 30 psql -h 127.0.0.1 -p "$PORT" -U postgres -d "$DBNAME" -XAtq -v ON_ERROR_STOP=1 \
    -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null ||
    die "CREATE EXTENSION pg_stat_statements failed (is it in shared_preload_libraries? see $DATA/postgresql.conf)"
  log "ready: $URL"
  echo "$URL"
}

stop() {
  if [ ! -f "$DATA/PG_VERSION" ]; then
    log "no cluster in $DATA"
    return 0
  fi
  if ! ours; then
    log "not running"
    return 0
  fi
  log "stopping the cluster in $DATA"
  as_owner timeout 90 "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null ||
    die "pg_ctl stop failed; see $LOGFILE"
}

status() {
  if ready && ours; then
    echo "up $URL"
  else
    echo "down"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) echo "$URL" ;;
  *) die "usage: bench-pg.sh start|stop|status|url" ;;
esac
