#!/usr/bin/env bash
# Shared helpers of the scripts (source it).
#
#   ensure_postgres_db URL   start the local PostgreSQL cluster if URL's server does
#                            not answer, wait until ready, create URL's database if
#                            missing. Fails loudly.

log() { echo "${0##*/}: $*" >&2; }
die() { echo "${0##*/}: ERROR: $*" >&2; exit 1; }
need() {
  local t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"; done
}

ensure_postgres_db() {
  local url=$1
  need python3 pg_isready psql createdb timeout
# Split the URL (user, password, host, port, database) for the libpq tools.
url_parts=$(python3 - "$url" <<'EOF'
import sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
if u.scheme not in ("postgres", "postgresql"):
    sys.exit(f"the database URL must be postgres://..., got scheme {u.scheme!r}")
db = unquote(u.path.lstrip("/"))
if not db:
    sys.exit("the database URL has no database name")
for v in (unquote(u.username or "postgres"), unquote(u.password or ""),
          u.hostname or "127.0.0.1", str(u.port or 5432), db):
    if "\n" in v:
        sys.exit("newline in the database URL")
    print(v)
EOF
) || die "cannot parse URL=$url"
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

}

# bench_binary OUT: builds outbox-bench (release) unless BENCH_BIN names a
# prebuilt one, copies it next to OUT (another build in target/ must not swap
# the engine under a running suite), records the engine source it was built
# from in OUT's *.engine.diff, and prints the copy's path (the caller removes it).
bench_binary() {
  local out=$1 repo bin
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  need cargo
  if [ -n "${BENCH_BIN:-}" ]; then
    [ -x "$BENCH_BIN" ] || die "BENCH_BIN=$BENCH_BIN is not an executable"
    log "using the prebuilt $BENCH_BIN"
  else
    log "building outbox-bench (release)"
    (cd "$repo" && timeout 3600 cargo build --release -p outbox-bench >&2) || die "cargo build failed"
  fi
  mkdir -p "$(dirname "$out")"
  bin=${out%.jsonl}.outbox-bench
  cp "${BENCH_BIN:-$repo/target/release/outbox-bench}" "$bin" || die "cannot copy the benchmark binary to $bin"
  if [ -z "${BENCH_BIN:-}" ]; then
    (cd "$repo" && { git rev-parse HEAD; git diff HEAD -- outbox-core outbox-kafka; }) \
      >"${out%.jsonl}.engine.diff" 2>/dev/null || true
  fi
  echo "$bin"
}

# need_server NAME URL HINT: fail loudly unless the server of URL
# (scheme://[user[:pass]@]host[:port]/...) accepts TCP connections within 5 s.
need_server() {
  local name=$1 url=$2 hint=$3 hostport
  hostport=$(python3 - "$url" <<'PYEOF'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1] if "://" in sys.argv[1] else "x://" + sys.argv[1])
ports = {"amqp": 5672, "amqps": 5671, "nats": 4222, "tls": 4222, "redis": 6379, "rediss": 6379}
print(f"{u.hostname or '127.0.0.1'} {u.port or ports.get(u.scheme, 0)}")
PYEOF
) || die "cannot parse the $name URL $url"
  local host=${hostport% *} port=${hostport#* }
  timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null ||
    die "$name does not answer at $host:$port ($url). $hint"
}
