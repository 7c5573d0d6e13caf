#!/usr/bin/env bash
# Python venv for the Rust <-> faststream-outbox interop tests (tests/python/).
#
#   bash scripts/python-env.sh        # create/refresh the venv; last stdout line = its python
#
# Venv: ${OUTBOX_PY_VENV:-<repo>/.cache/py-venv}. Base interpreter: ${OUTBOX_BASE_PYTHON:-python3}
# (needs >= 3.11, faststream-outbox's floor).
# Idempotent: a marker file in the venv records the exact requirement set it was
# built from; when it matches (and the venv's python still runs) nothing is done.
# All progress goes to stderr; stdout carries only the python path.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OUTBOX_PY_VENV:-$REPO/.cache/py-venv}
BASE_PY=${OUTBOX_BASE_PYTHON:-python3}

# The complete, fully pinned set (faststream-outbox 0.19.0 and everything it pulls
# in with the asyncpg driver, plus FastStream's RabbitMQ, NATS and Redis clients
# for the transport interop tests), so every machine gets the same
# encoder/decoder.
REQUIREMENTS=(
  faststream-outbox==0.19.0
  'faststream[rabbit,nats,redis]==0.7.8'
  aio-pika==10.2.1
  aiormq==7.2.4
  pamqp==4.0.1
  yarl==1.25.1
  multidict==7.2.1
  propcache==0.5.4
  nats-py==2.16.0
  redis==8.2.0
  fast-depends==3.0.9
  'sqlalchemy[asyncio]==2.1.9'
  greenlet==3.5.6
  asyncpg==0.30.0
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0
  anyio==4.16.0
  idna==3.20
)

log() { echo "python-env.sh: $*" >&2; }
die() { echo "python-env.sh: ERROR: $*" >&2; exit 1; }

command -v "$BASE_PY" >/dev/null 2>&1 ||
  die "'$BASE_PY' not found (install Python >= 3.11 or set OUTBOX_BASE_PYTHON)"
command -v flock >/dev/null 2>&1 || die "'flock' (util-linux) not found"

PY=$VENV/bin/python
MARKER=$VENV/.outbox-requirements
WANT="$(printf '%s\n' "${REQUIREMENTS[@]}")"

is_current() {
  [ -x "$PY" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ] &&
    timeout 30 "$PY" -c 'import importlib.util as u, sys
sys.exit(0 if all(u.find_spec(m) for m in ("faststream_outbox", "asyncpg", "sqlalchemy", "aio_pika", "nats", "redis")) else 1)' \
      >/dev/null 2>&1
}

mkdir -p "$(dirname "$VENV")"
# Serialise concurrent runs (two test processes setting up at once).
exec 9>"$VENV.lock"
timeout 600 flock 9 || die "could not lock $VENV.lock within 600 s"

if is_current; then
  echo "$PY"
  exit 0
fi

timeout 30 "$BASE_PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
  die "$BASE_PY is $("$BASE_PY" -V 2>&1); faststream-outbox 0.19 needs Python >= 3.11"

if [ ! -x "$PY" ] || ! timeout 30 "$PY" -c 'import sys' >/dev/null 2>&1; then
  log "creating venv at $VENV"
  rm -rf "$VENV"
  # --without-pip: seeding pip costs ~10 s; the base interpreter's pip installs
  # into the venv with --python (pip >= 22.3) instead.
  timeout 120 "$BASE_PY" -m venv --without-pip "$VENV" >&2 ||
    die "'$BASE_PY -m venv $VENV' failed (on Debian: apt-get install python3-venv)"
fi

# Which pip: the base interpreter's (pip >= 22.3 has --python), else the venv's own.
if timeout 60 "$BASE_PY" -m pip --python "$PY" --version >/dev/null 2>&1; then
  PIP=("$BASE_PY" -m pip --python "$PY")
else
  if ! timeout 60 "$PY" -m pip --version >/dev/null 2>&1; then
    log "seeding pip into the venv (ensurepip)"
    timeout 300 "$PY" -m ensurepip --default-pip >&2 ||
      die "no usable pip: '$BASE_PY -m pip' lacks --python and ensurepip failed"
  fi
  PIP=("$PY" -m pip)
fi

rm -f "$MARKER"
log "installing: ${REQUIREMENTS[*]}"
if ! timeout 600 "${PIP[@]}" install --disable-pip-version-check --no-input --quiet \
      --no-compile "${REQUIREMENTS[@]}" >&2; then
  die "pip install into $VENV failed (see the pip output above; PyPI reachable?)"
fi
timeout 60 "$PY" -c 'import faststream_outbox, faststream, asyncpg, sqlalchemy.ext.asyncio, aio_pika, nats, redis' >&2 ||
  die "the venv at $VENV cannot import faststream_outbox/asyncpg/aio_pika/nats/redis after install"
printf '%s\n' "$WANT" >"$MARKER"
log "ready: $("$PY" -V 2>&1), faststream-outbox 0.19.0, faststream[rabbit,nats,redis] 0.7.8"
echo "$PY"
