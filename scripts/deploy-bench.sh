#!/usr/bin/env bash
# What clients see during a deploy, measured with `gale bench deploy`:
#
#   takeover  a node with N connections (each subscribed to a topic with
#             history, a publication every 10 ms round 10 topics, 180
#             requests/s) is upgraded in place: `gale serve --takeover`
#             starts at second 15 and the old process exits.
#   drain     two nodes in cluster mode on a private Redis; the same
#             clients on node A, which is sent SIGTERM with drain_s = 30:
#             its clients come back on node B and recover from history.
#
#   scripts/deploy-bench.sh                 # both, 18,000 connections
#   N=2000 scripts/deploy-bench.sh takeover # one, fewer connections
#   scripts/deploy-bench.sh steady          # the same load, no event
#   DRAIN_S=0 RATE=1000 scripts/deploy-bench.sh drain
#                       # every connection closed at once, node B taking
#                       # at most 1,000 handshakes/s (server.handshake_rate)
#   TLS=1 scripts/deploy-bench.sh takeover  # the clients on wss:// (gale's
#                       # own TLS, the test certificate), publishing over
#                       # HTTPS; TLS12=1 as well: every client on TLS 1.2
#
# Prints each run's JSON report. Release build; traffic stays on
# 127.0.0.0/8; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-18000}"
DRAIN_S="${DRAIN_S:-30}"
RATE="${RATE:-0}"
RUNS="${*:-takeover drain}"
TLS="${TLS:-0}"
TLS12="${TLS12:-0}"
KEY="deploy-bench-key-0123456789"
OUT="$PWD/target/deploy-bench"
GALE="$PWD/target/release/gale"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "gale serve --config $OUT/" 2>/dev/null || true
}
trap cleanup EXIT

cargo build --release --quiet
ulimit -n 20000

. scripts/ports.sh

# config FILE PORT [extra TOML]
config() {
  cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
max_connections = 19000
max_connections_per_ip = 0
handoff_socket = "$(dirname "$1")/handoff.sock"
$(tls_settings)
$3

[api]
key = "$KEY"

[topics."deploy:*"]
subscribe = "anyone"
presence = true
history_size = 2000
history_ttl_s = 600
TOML
}

# The server's TLS settings (TLS=1), and the clients' URLs.
tls_settings() {
  if [ "$TLS" = 1 ]; then
    printf 'tls_cert = "%s"\ntls_key = "%s"\n' "$PWD/tests/keys/tls-cert.pem" "$PWD/tests/keys/tls-key.pem"
  fi
}
ws_url() { # PORT
  if [ "$TLS" = 1 ]; then echo "wss://localhost:$1/ws"; else echo "ws://127.0.0.1:$1/ws"; fi
}
tls_args() { # PORT
  if [ "$TLS" = 1 ]; then
    echo "--publish-to https://localhost:$1"
    if [ "$TLS12" = 1 ]; then echo "--tls12"; fi
  fi
}
export SSL_CERT_FILE="$PWD/tests/keys/tls-cert.pem"

serve() { # DIR [args…]
  local dir="$1"
  shift
  GALE_STORE__URL="sqlite://$dir/gale.db" GALE_STORE__SPILL_DIR="$dir/spill" RUST_LOG=warn,gale_engine::handoff=info,gale_engine::drain=info \
    "$GALE" serve --config "$dir/gale.toml" "$@" >>"$dir/gale.log" 2>&1 &
  PIDS+=($!)
  LAST=$!
}

takeover() {
  local dir="$OUT/takeover"
  rm -rf "$dir" && mkdir -p "$dir"
  local port
  port=$(free_port)
  config "$dir/gale.toml" "$port" ""
  serve "$dir"
  local old=$LAST
  wait_port "$port"
  echo "== takeover: $N connections on pid $old; gale serve --takeover at 15 s" >&2
  # shellcheck disable=SC2046 # tls_args is a list of words
  "$GALE" bench deploy "$(ws_url "$port")" $(tls_args "$port") -n "$N" --sources 4 --connect-rate 3000 \
    --api-key "$KEY" --duration 40 --event-at-s 15 --server-pid "$old" \
    --exec "GALE_STORE__URL=sqlite://$dir/gale.db GALE_STORE__SPILL_DIR=$dir/spill RUST_LOG=warn,gale_engine::handoff=info $GALE serve --config $dir/gale.toml --takeover >>$dir/new.log 2>&1 &"
  grep -h "handoff" "$dir/gale.log" "$dir/new.log" | cut -c1-220 >&2 || true
  pkill -f "gale serve --config $dir/" 2>/dev/null || true
  sleep 1
}

# The takeover's setting with no event: the pauses and reply latency of
# the load itself, to read the takeover's against.
steady() {
  local dir="$OUT/steady"
  rm -rf "$dir" && mkdir -p "$dir"
  local port
  port=$(free_port)
  config "$dir/gale.toml" "$port" ""
  serve "$dir"
  wait_port "$port"
  echo "== steady: $N connections, no event" >&2
  # shellcheck disable=SC2046 # tls_args is a list of words
  "$GALE" bench deploy "$(ws_url "$port")" $(tls_args "$port") -n "$N" --sources 4 --connect-rate 3000 \
    --api-key "$KEY" --duration 40 --event-at-s 15
  pkill -f "gale serve --config $dir/" 2>/dev/null || true
  sleep 1
}

drain() {
  local dir="$OUT/drain"
  rm -rf "$dir" && mkdir -p "$dir/a" "$dir/b" "$dir/redis"
  local rport a b
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir/redis" >"$dir/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$rport"
  a=$(free_port)
  b=$(free_port)
  local cluster="drain_s = $DRAIN_S
drain_reconnect_ms = 5000

[cluster]
redis_url = \"redis://127.0.0.1:$rport\""
  config "$dir/a/gale.toml" "$a" "$cluster"
  # The receiving node smooths the wave (RATE > 0).
  config "$dir/b/gale.toml" "$b" "handshake_rate = $RATE
$cluster"
  # Each node has its own handoff socket, in its own directory.
  serve "$dir/a"
  local pa=$LAST
  serve "$dir/b"
  wait_port "$a"
  wait_port "$b"
  echo "== drain: $N connections on node A (pid $pa), SIGTERM at 10 s, drain_s = $DRAIN_S, into node B (handshake_rate = $RATE)" >&2
  "$GALE" bench deploy "ws://127.0.0.1:$a/ws,ws://127.0.0.1:$b/ws" -n "$N" --sources 8 --connect-rate 3000 \
    --api-key "$KEY" --publish-to "http://127.0.0.1:$b" --duration 60 --event-at-s 10 --event-window-s 35 \
    --server-pid "$pa" --exec "kill -TERM $pa"
  pkill -f "gale serve --config $dir/" 2>/dev/null || true
  sleep 1
}

for run in $RUNS; do
  "$run"
done
