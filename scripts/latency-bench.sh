#!/usr/bin/env bash
# Publish-to-delivery latency of paced publications, as users feel it:
# `gale bench broadcast --rate R` stamps each publication and every
# subscriber times each delivery (p50 / p99 / p99.9 / max over every
# delivery), and counts publications the publisher sent late.
#
#   scripts/latency-bench.sh              # all four, a fresh server each
#   scripts/latency-bench.sh one tenk     # some of them
#   SERVER=/tmp/gale-old scripts/latency-bench.sh   # another build as the server
#   SERVER=floor scripts/latency-bench.sh burst     # the floor as the server:
#             `gale bench floor`, one write per connection per batch and
#             nothing else (docs/benchmarks.md, "The floor")
#
#   one       1 subscriber, 10 publications/s, 100 of them
#   thousand  1,000 subscribers, 100/s, 1,000 publications
#   tenk      10,000 subscribers, 10/s, 100 publications
#   burst     19,000 subscribers, 200 publications back to back
#   long      19,000 subscribers, 600 back to back (docs/benchmarks.md,
#             "Idle sockets written by whoever pushes": with
#             GALE_BROADCAST__BATCH_SIZE=36 GALE_BROADCAST__BATCH_WINDOW_MS=20,
#             which the server inherits, against SERVER=floor FLOOR_BATCH=36:
#             like batches, so like writes per connection)
#
# 1 KB pushes. The generator is this checkout's release `gale` whatever
# the server; both share this machine's cores. Traffic stays on
# 127.0.0.0/8; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${*:-one thousand tenk burst}"
KEY="latency-bench-key-0123456789"
OUT="$PWD/target/latency-bench"
GALE="$PWD/target/release/gale"
SERVER="${SERVER:-$GALE}"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT

cargo build --release --quiet
ulimit -n 20000

. scripts/ports.sh

# run NAME SUBSCRIBERS MESSAGES RATE [bench args…]
run() {
  local name="$1" n="$2" m="$3" rate="$4"
  shift 4
  local dir="$OUT/$name" port
  rm -rf "$dir" && mkdir -p "$dir"
  port=$(free_port)
  if [ "$SERVER" = floor ]; then
    # Paced, it writes each publication at once; a burst it gathers for
    # 2 ms, as gale does under load.
    # FLOOR_BATCH caps its batches (gale's average batch, to compare like
    # with like: see `gale bench floor --help`).
    "$GALE" bench floor --listen "127.0.0.1:$port" --window-ms "$([ "$rate" = 0 ] && echo 2 || echo 0)" \
      --max-batch "${FLOOR_BATCH:-256}" \
      >"$dir/floor.log" 2>&1 &
  else
    GALE_SERVER__LISTEN="127.0.0.1:$port" GALE_SERVER__MAX_CONNECTIONS=20000 \
      GALE_SERVER__MAX_CONNECTIONS_PER_IP=0 GALE_API__KEY="$KEY" \
      GALE_STORE__URL="sqlite://$dir/gale.db" GALE_STORE__SPILL_DIR="$dir/spill" RUST_LOG=warn \
      "$SERVER" serve --config scripts/bench.toml >"$dir/gale.log" 2>&1 &
  fi
  PID=$!
  wait_port "$port"
  echo "== $name: $n subscribers, $m publications at ${rate}/s (0: back to back), server $SERVER" >&2
  "$GALE" bench broadcast "ws://127.0.0.1:$port/ws" -n "$n" -m "$m" --rate "$rate" \
    --api-key "$KEY" --server-pid "$PID" --json "$@"
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=""
}

for r in $RUNS; do
  case "$r" in
    one) run one 1 100 10 ;;
    thousand) run thousand 1000 1000 100 --connect-rate 5000 ;;
    tenk) run tenk 10000 100 10 --sources 4 --connect-rate 5000 ;;
    burst) run burst 19000 200 0 --procs 2 --sources 4 --connect-rate 5000 ;;
    long) run long 19000 600 0 --procs 2 --sources 4 --connect-rate 5000 ;;
    *) echo "unknown run: $r (one, thousand, tenk, burst, long)" >&2; exit 2 ;;
  esac
done
