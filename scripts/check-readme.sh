#!/usr/bin/env bash
# Builds the README quickstart as a new user would: its own crate, outside the
# workspace, with the README's `[dependencies]` block, then runs it against
# PostgreSQL and Kafka (called by scripts/test.sh).
#
#   bash scripts/check-readme.sh [--build-only]
#
# The crate is the `toml` block after `<!-- quickstart:Cargo.toml -->` and the
# `rust` block after `<!-- quickstart:main.rs -->` in README.md, written to a
# temporary directory. Only the version requirements of our own crates are
# rewritten, into path dependencies on this checkout (`outbox-core = "0.1"` ->
# `outbox-core = { path = ".../outbox-core" }`); everything else is what the
# README shows. The workspace's Cargo.lock is copied in (same dependency
# versions) and CARGO_TARGET_DIR defaults to the workspace's target/, so the
# dependencies already built for the workspace (rdkafka's librdkafka above all)
# are reused: the script lists what it had to compile.
#
# Then (unless --build-only) it runs the program against a fresh database
# `outbox_readme` on the server of OUTBOX_TEST_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/outbox_test) and the broker at
# KAFKA_BOOTSTRAP (required), waits until it printed `got order 1` and the
# outbox is empty (the record was confirmed by Kafka), stops it with SIGTERM
# and requires exit status 0.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo python3 timeout

build_only=0
case "${1:-}" in
  --build-only) build_only=1 ;;
  "") ;;
  *) die "usage: $0 [--build-only]" ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/outbox-readme.XXXXXX")
pid=
cleanup() {
  local rc=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# --- The crate, from README.md ------------------------------------------------
mkdir -p "$work/src"
python3 - "$REPO" "$work" <<'EOF' || die "cannot extract the quickstart from README.md"
import re
import sys
from pathlib import Path

repo, work = Path(sys.argv[1]), Path(sys.argv[2])
lines = (repo / "README.md").read_text().splitlines()

def block(marker, lang):
    """The fenced block of `lang` right after the line starting with `marker`."""
    starts = [i for i, l in enumerate(lines) if l.startswith(marker)]
    if len(starts) != 1:
        sys.exit(f"README.md: expected one line starting with {marker!r}, found {len(starts)}")
    i = starts[0] + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or lines[i].strip() != "```" + lang:
        sys.exit(f"README.md: no ```{lang} block right after {marker!r}")
    end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
    if end is None:
        sys.exit(f"README.md: the ```{lang} block after {marker!r} is not closed")
    return "\n".join(lines[i + 1 : end]) + "\n"

manifest = block("<!-- quickstart:Cargo.toml", "toml")
main = block("<!-- quickstart:main.rs", "rust")

# Our crates: a version requirement becomes a path on this checkout.
ours = [p.parent.name for p in repo.glob("outbox-*/Cargo.toml")]
def to_path(m):
    name, rest = m.group(1), m.group(2)
    path = (repo / name).as_posix()
    if rest.startswith('"'):  # outbox-core = "0.1"
        return f'{name} = {{ path = "{path}" }}'
    # outbox-core = { version = "0.1", features = [..] }
    table, n = re.subn(r'\bversion\s*=\s*"[^"]*"', f'path = "{path}"', rest, count=1)
    if n != 1:
        sys.exit(f"README.md: cannot rewrite the dependency line {m.group(0)!r}")
    return f"{name} = {table}"
pattern = re.compile(r'^(' + "|".join(map(re.escape, ours)) + r')\s*=\s*(.*)$', re.M)
manifest, rewritten = pattern.subn(to_path, manifest)
if rewritten == 0:
    sys.exit("README.md: the quickstart's [dependencies] name none of " + ", ".join(ours))

# The workspace's profiles, so the shared target/ holds one build of each
# dependency (a different profile would rebuild them all).
ws = (repo / "Cargo.toml").read_text()
profiles = re.findall(r'^\[profile\.[^\n]*\n(?:(?!\[)[^\n]*\n?)*', ws, re.M)

(work / "Cargo.toml").write_text(
    '[package]\nname = "readme-quickstart"\nversion = "0.0.0"\nedition = "2024"\npublish = false\n\n'
    + manifest
    + "\n# Its own workspace, wherever the temporary directory is.\n[workspace]\n"
    + "".join("\n" + p for p in profiles)
)
(work / "src" / "main.rs").write_text(main)
print(f"rewrote {rewritten} dependencies to paths", file=sys.stderr)
EOF
cp "$REPO/Cargo.lock" "$work/Cargo.lock"
log "quickstart crate in $work:"
sed 's/^/  | /' "$work/Cargo.toml" >&2

# --- Build --------------------------------------------------------------------
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
log "cargo build (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
build_log=$work/build.log
if ! (cd "$work" && timeout 1800 cargo build --color never) >"$build_log" 2>&1; then
  cat "$build_log" >&2
  die "the README quickstart does not build"
fi
compiled=$(sed -n 's/^ *Compiling \([^ ]*\) .*/\1/p' "$build_log" | tr '\n' ' ')
log "compiled: ${compiled:-nothing (all up to date)}"
# Warnings of the quickstart itself (say, a deprecated API), not of our crates.
if grep -q '^warning: `readme-quickstart`' "$build_log"; then
  cat "$build_log" >&2
  die "the README quickstart builds with warnings"
fi
bin=$CARGO_TARGET_DIR/debug/readme-quickstart
[ -x "$bin" ] || die "no binary at $bin"
if [ "$build_only" = 1 ]; then
  log "README quickstart builds (--build-only: not run)"
  exit 0
fi

# --- Run ----------------------------------------------------------------------
: "${KAFKA_BOOTSTRAP:?KAFKA_BOOTSTRAP must be set (bash scripts/kafka.sh start; export KAFKA_BOOTSTRAP=\$(bash scripts/kafka.sh env | cut -d= -f2)), or pass --build-only}"
test_url=${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_test}
db_url=$(python3 - "$test_url" <<'EOF'
import sys
from urllib.parse import urlsplit, urlunsplit
u = urlsplit(sys.argv[1])
print(urlunsplit(u._replace(path="/outbox_readme")))
EOF
)
need psql dropdb
ensure_postgres_db "$test_url" # starts PostgreSQL if needed; sets PG=(-h .. -p .. -U ..)
log "fresh database outbox_readme"
timeout 60 dropdb "${PG[@]}" --if-exists --force outbox_readme || die "dropdb outbox_readme failed"
ensure_postgres_db "$db_url"

out=$work/run.log
log "running the quickstart (DATABASE_URL=$db_url KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP)"
# RUST_LOG unset: the quickstart's own default filter (info) applies.
env -u RUST_LOG DATABASE_URL="$db_url" KAFKA_BOOTSTRAP="$KAFKA_BOOTSTRAP" "$bin" >"$out" 2>&1 &
pid=$!

rows() {
  echo 'SELECT count(*) FROM outbox' |
    timeout 10 psql "${PG[@]}" -d outbox_readme -XAtq -v ON_ERROR_STOP=1 2>/dev/null || echo "?"
}
deadline=$((SECONDS + 120))
until grep -q '^got order 1$' "$out" && [ "$(rows)" = 0 ]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    rc=0
    wait "$pid" || rc=$?
    pid=
    sed 's/^/  [quickstart] /' "$out" >&2
    die "the quickstart exited (status $rc) before relaying order 1"
  fi
  if [ $SECONDS -ge $deadline ]; then
    sed 's/^/  [quickstart] /' "$out" >&2
    die "the quickstart did not print 'got order 1' and empty the outbox within 120 s (rows left: $(rows))"
  fi
  sleep 0.2
done

log "got order 1, outbox empty: stopping it with SIGTERM"
kill -TERM "$pid"
deadline=$((SECONDS + 30))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
if kill -0 "$pid" 2>/dev/null; then
  sed 's/^/  [quickstart] /' "$out" >&2
  die "the quickstart did not stop within 30 s of SIGTERM"
fi
rc=0
wait "$pid" || rc=$?
pid=
sed 's/^/  [quickstart] /' "$out" >&2
[ "$rc" = 0 ] || die "the quickstart exited with status $rc after SIGTERM (expected 0)"
# Tracing is initialised at info: the App's own lines are there.
for p in 'INFO.*outbox app started' 'INFO.*SIGTERM received'; do
  grep -qE -- "$p" "$out" || die "quickstart output: expected a line matching '$p'"
done
log "README quickstart OK: built outside the workspace, relayed order 1, exited 0 on SIGTERM"
