#!/usr/bin/env bash
# Checks the tutorial (docs/tutorial/*.md) against code that CI builds and runs
# (called by scripts/check-examples.sh, hence by scripts/test.sh):
#
#   bash scripts/check-tutorial.sh [--static | --write]
#
# 1. Every ```rust block of docs/tutorial/*.md is a copy of a file, or of a
#    region of one, under examples/tutorial/: the line right before the block
#    names it, `<!-- include: examples/tutorial/app.rs#charge -->` (a region is
#    the text between `// ANCHOR: charge` and `// ANCHOR_END: charge`, without
#    the ANCHOR lines; no `#name` = the whole file). A block without that line,
#    or one that differs from its source, fails the check with a diff. Those
#    files are examples of the `examples` crate (tutorial_*), so the workspace
#    build compiles them, and the tests of tutorial_app run with the
#    workspace's tests.
# 2. docs/tutorial/docker-compose.yml is valid YAML with a `kafka` service.
# 3. The tutorial's project is built as a reader builds it: its own crate, with
#    the `toml` block after `<!-- tutorial:Cargo.toml -->` in 01-install.md as
#    its manifest (our crates' versions rewritten to paths on this checkout)
#    and examples/tutorial/app.rs as src/main.rs; `cargo test` runs its tests
#    (in memory: no services needed). So the dependencies and features the
#    install page lists are the ones the tutorial's code needs.
# (--static: only 1 and 2. --write: copy every included source region into
# its block of the markdown first, after changing examples/tutorial/, then 1 and 2.)
# 4. The three programs run against PostgreSQL (a fresh database
#    `outbox_tutorial` on the server of DATABASE_URL) and the Kafka broker at
#    KAFKA_BOOTSTRAP, each until it printed what the tutorial shows, then
#    SIGTERM, exit status 0 required. With tutorial_app, the page's `outbox`
#    commands run too (dlq list/show, stats) and /metrics is read.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo python3 timeout

static_only=0
write=0
case "${1:-}" in
  --static) static_only=1 ;;
  --write) static_only=1 write=1 ;;
  "") ;;
  *) die "usage: $0 [--static | --write]" ;;
esac

# --- 1 and 2: the markdown against its sources ----------------------------------
log "docs/tutorial: code blocks against examples/tutorial/"
python3 - "$REPO" "$write" <<'EOF' || die "docs/tutorial does not match examples/tutorial (see above; --write copies the sources in)"
import difflib
import re
import sys
from pathlib import Path

repo, write = Path(sys.argv[1]), sys.argv[2] == "1"
pages = sorted((repo / "docs" / "tutorial").glob("*.md"))
if not pages:
    sys.exit("no docs/tutorial/*.md")
marker = re.compile(r"^<!-- include: (examples/tutorial/[\w./-]+?)(?:#(\w+))? -->$")
errors, blocks = [], 0

def region(path, name):
    lines = (repo / path).read_text().splitlines()
    if name is None:
        body = lines
    else:
        starts = [i for i, l in enumerate(lines) if l.strip() == f"// ANCHOR: {name}"]
        ends = [i for i, l in enumerate(lines) if l.strip() == f"// ANCHOR_END: {name}"]
        if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
            raise ValueError(f"{path}: no single region '{name}'")
        body = lines[starts[0] + 1 : ends[0]]
    return [l for l in body if not re.match(r"^\s*// ANCHOR(_END)?: \w+$", l)]

for page in pages:
    lines = page.read_text().splitlines()
    rel = page.relative_to(repo)
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)", lines[i])
        if not fence:
            if marker.match(lines[i].strip()):
                nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
                if not nxt.startswith("```rust"):
                    errors.append(f"{rel}:{i + 1}: an include line must be right before a ```rust block")
            i += 1
            continue
        indent, lang = fence.group(1), fence.group(2)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            errors.append(f"{rel}:{i + 1}: unclosed code block")
            break
        if lang.split(",")[0] == "rust":
            blocks += 1
            m = marker.match(lines[i - 1].strip()) if i > 0 else None
            if not m:
                errors.append(f"{rel}:{i + 1}: a rust block without '<!-- include: examples/tutorial/FILE[#REGION] -->' right before it")
            else:
                body = [l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1 : end]]
                try:
                    want = region(m.group(1), m.group(2))
                except (OSError, ValueError) as e:
                    errors.append(f"{rel}:{i}: {e}")
                else:
                    if body != want and write:
                        lines[i + 1 : end] = [indent + l if l else l for l in want]
                        page.write_text("\n".join(lines) + "\n")
                        print(f"{rel}:{i + 1}: rewritten from {m.group(0)}", file=sys.stderr)
                        blocks -= 1  # checked again on the next pass over the same fence
                        continue
                    if body != want:
                        diff = "\n".join(difflib.unified_diff(want, body, m.group(0), str(rel), lineterm=""))
                        errors.append(f"{rel}:{i + 1}: differs from {m.group(1)}#{m.group(2)}:\n{diff}")
        i = end + 1

import yaml
compose = yaml.safe_load((repo / "docs/tutorial/docker-compose.yml").read_text())
if "kafka" not in (compose or {}).get("services", {}):
    errors.append("docs/tutorial/docker-compose.yml: no 'kafka' service")

for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{blocks} rust blocks in {len(pages)} pages match their sources", file=sys.stderr)
EOF
if [ "$static_only" = 1 ]; then
  log "tutorial static checks OK (--static: not built, not run)"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/outbox-tutorial.XXXXXX")
pid=
cleanup() {
  local rc=$?
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# --- 3: the tutorial's project, as its own crate ---------------------------------
mkdir -p "$work/crate/src"
python3 - "$REPO" "$work/crate" <<'EOF' || die "cannot build the tutorial's crate from docs/tutorial/01-install.md"
import re
import sys
from pathlib import Path

repo, crate = Path(sys.argv[1]), Path(sys.argv[2])
lines = (repo / "docs/tutorial/01-install.md").read_text().splitlines()
starts = [i for i, l in enumerate(lines) if l.startswith("<!-- tutorial:Cargo.toml")]
if len(starts) != 1:
    sys.exit(f"01-install.md: expected one '<!-- tutorial:Cargo.toml' line, found {len(starts)}")
i = starts[0] + 1
if i >= len(lines) or lines[i].strip() != "```toml":
    sys.exit("01-install.md: no ```toml block right after '<!-- tutorial:Cargo.toml'")
end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
manifest = "\n".join(lines[i + 1 : end]) + "\n"
ours = [p.parent.name for p in repo.glob("outbox-*/Cargo.toml")]
def to_path(m):
    name, rest = m.group(1), m.group(2)
    path = (repo / name).as_posix()
    if rest.startswith('"'):
        return f'{name} = {{ path = "{path}" }}'
    table, n = re.subn(r'\bversion\s*=\s*"[^"]*"', f'path = "{path}"', rest, count=1)
    if n != 1:
        sys.exit(f"01-install.md: cannot rewrite {m.group(0)!r}")
    return f"{name} = {table}"
manifest, n = re.subn(r"^(" + "|".join(map(re.escape, ours)) + r")\s*=\s*(.*)$", to_path, manifest, flags=re.M)
if n == 0:
    sys.exit("01-install.md: the Cargo.toml block names none of our crates")
if "[package]" not in manifest:
    manifest = '[package]\nname = "outbox-tutorial"\nversion = "0.1.0"\nedition = "2024"\npublish = false\n\n' + manifest
ws = (repo / "Cargo.toml").read_text()
profiles = re.findall(r"^\[profile\.[^\n]*\n(?:(?!\[)[^\n]*\n?)*", ws, re.M)
(crate / "Cargo.toml").write_text(manifest + "\n[workspace]\n" + "".join("\n" + p for p in profiles))
(crate / "src" / "main.rs").write_text((repo / "examples/tutorial/app.rs").read_text())
EOF
cp "$REPO/Cargo.lock" "$work/crate/Cargo.lock"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
log "the tutorial's crate (01-install.md's Cargo.toml + examples/tutorial/app.rs): cargo test"
if ! (cd "$work/crate" && timeout 1800 cargo test --color never) >"$work/crate.log" 2>&1; then
  sed 's/^/  | /' "$work/crate/Cargo.toml" >&2
  cat "$work/crate.log" >&2
  die "the tutorial's crate does not build or its tests fail"
fi
grep -q '^warning: `outbox-tutorial`' "$work/crate.log" && { cat "$work/crate.log" >&2; die "the tutorial's crate builds with warnings"; }
grep -E '^test result:' "$work/crate.log" | sed 's/^/  /' >&2

# --- 4: the programs ------------------------------------------------------------
: "${DATABASE_URL:?DATABASE_URL must be set (a database on the server the tutorial programs use)}"
: "${KAFKA_BOOTSTRAP:?KAFKA_BOOTSTRAP must be set (bash scripts/kafka.sh start)}"
need psql dropdb curl
db_url=$(python3 - "$DATABASE_URL" <<'EOF'
import sys
from urllib.parse import urlsplit, urlunsplit
print(urlunsplit(urlsplit(sys.argv[1])._replace(path="/outbox_tutorial")))
EOF
)
ensure_postgres_db "$DATABASE_URL" # sets PG=(-h .. -p .. -U ..)
timeout 60 dropdb "${PG[@]}" --if-exists --force outbox_tutorial || die "dropdb outbox_tutorial failed"
ensure_postgres_db "$db_url"
sql() { timeout 10 psql "${PG[@]}" -d outbox_tutorial -XAtq -v ON_ERROR_STOP=1 -c "$1"; }

log "cargo build -p examples (tutorial_*) and -p outbox-cli"
timeout 1800 cargo build -q -p examples --example tutorial_first_app --example tutorial_kafka_relay \
  --example tutorial_app || die "the tutorial's examples do not build"
timeout 1800 cargo build -q -p outbox-cli || die "outbox-cli does not build"
bin=$CARGO_TARGET_DIR/debug
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$work/run.log

# start EXAMPLE: runs it in the background with the tutorial's environment.
start() {
  log "running $1"
  : >"$out"
  env -u RUST_LOG DATABASE_URL="$db_url" KAFKA_BOOTSTRAP="$KAFKA_BOOTSTRAP" \
    METRICS_ADDR="127.0.0.1:$metrics_port" "$bin/examples/$1" >"$out" 2>&1 &
  pid=$!
}
# wait_for WHAT CONDITION...: until CONDITION succeeds (120 s), or fail.
wait_for() {
  local what=$1 deadline=$((SECONDS + 120))
  shift
  until "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      sed 's/^/  [run] /' "$out" >&2
      die "the program exited before: $what"
    fi
    [ $SECONDS -lt $deadline ] || { sed 's/^/  [run] /' "$out" >&2; die "not within 120 s: $what"; }
    sleep 0.2
  done
}
printed() { grep -qE -- "$1" "$out"; }
outbox_empty() { [ "$(sql 'SELECT count(*) FROM outbox' 2>/dev/null)" = 0 ]; }
# stop: SIGTERM, exit status 0 within 30 s.
stop() {
  kill -TERM "$pid"
  local deadline=$((SECONDS + 30)) rc=0
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && { sed 's/^/  [run] /' "$out" >&2; die "no stop within 30 s of SIGTERM"; }
  wait "$pid" || rc=$?
  pid=
  sed 's/^/  [run] /' "$out" >&2
  [ "$rc" = 0 ] || die "exit status $rc after SIGTERM (expected 0)"
  printed 'SIGTERM received' || die "no 'SIGTERM received' line"
}

start tutorial_first_app
wait_for "published order 1, got order 1, outbox empty" \
  eval "printed '^published order 1$' && printed '^got order 1$' && outbox_empty"
stop

start tutorial_kafka_relay
wait_for "got order 2, outbox empty (Kafka confirmed)" \
  eval "printed '^published order 2$' && printed '^got order 2$' && outbox_empty"
stop

start tutorial_app
dead_letters() { [ "$(sql 'SELECT count(*) FROM outbox_dlq' 2>/dev/null)" = 1 ]; }
wait_for "both orders relayed, order 3 charged, order 4's payment dead-lettered" \
  eval "printed '^charging order 3: the provider timed out$' && printed '^charged order 3 \(1500 cents\) on delivery 2$' \
    && printed '^got order 4$' && outbox_empty && dead_letters"
cli() { env -u RUST_LOG DATABASE_URL="$db_url" timeout 60 "$bin/outbox" "$@"; }
dlq=$(cli dlq list --queue payments) || die "outbox dlq list failed"
echo "$dlq" | sed 's/^/  [outbox dlq list] /' >&2
grep -qE 'rejected' <<<"$dlq" || die "outbox dlq list: no 'rejected' dead letter"
dlq_id=$(sql 'SELECT id FROM outbox_dlq')
shown=$(cli dlq show "$dlq_id") || die "outbox dlq show failed"
echo "$shown" | sed 's/^/  [outbox dlq show] /' >&2
grep -q 'order 4: nothing to charge' <<<"$shown" || die "outbox dlq show: no last exception"
stats=$(cli stats) || die "outbox stats failed"
echo "$stats" | sed 's/^/  [outbox stats] /' >&2
grep -q 'payments' <<<"$stats" || die "outbox stats: no 'payments' line"
metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics") || die "GET /metrics failed"
for m in outbox_acked_total outbox_dlq_written_total outbox_nacked_retried_total; do
  grep -q "^$m" <<<"$metrics" || die "/metrics: no $m"
done
stop
log "tutorial OK: its code matches examples/tutorial, its crate builds and tests pass, its programs ran"
