#!/usr/bin/env bash
# Screenshots of the operator dashboard for the docs:
#
#   bash scripts/screenshots.sh [OUT_DIR]      # default: docs/img
#
# Seeds a demo outbox (schema `shop` of DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/outbox_demo; the schema is dropped and
# created again), runs an App on it with the dashboard embedded while orders
# keep coming in (OUTBOX_SCREENSHOTS_WARMUP seconds, default 40, so that the
# relay-rate chart has a line), and writes a 1280x800 PNG of each page with
# headless Chromium over Debian's chromedriver:
#   dashboard-queues.png  dashboard-dead-letters.png  dashboard-dead-letter.png
#   dashboard-relays.png  dashboard-rows.png
# (tests/src/bin/dashboard_screenshots.rs). Needs chromium and chromium-driver
# (Debian packages; scripts/test.sh installs them).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/common.sh
. "$REPO/scripts/common.sh"
need cargo

case "${1:-}" in
  -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
esac
OUT=${1:-$REPO/docs/img}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ] ||
  die "chromium or chromedriver not found: apt-get install -y chromium chromium-driver"

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/outbox_demo}
ensure_postgres_db "$DATABASE_URL"

log "cargo run -p tests --bin dashboard_screenshots -- $OUT"
cargo run -q -p tests --all-features --bin dashboard_screenshots -- "$OUT" ||
  die "dashboard_screenshots failed (see above)"
log "screenshots written to $OUT"
