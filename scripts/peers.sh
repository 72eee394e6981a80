#!/usr/bin/env bash
# gale beside other real-time servers, each with its documented public
# API and production settings, measured by one client that speaks each
# protocol (docs/benchmarks.md, "Compared with other servers"):
#
#   gale          this checkout's release build, scripts/bench.toml
#   socketioxide  Socket.IO on Rust (crates.io), peers/src/socketio.rs
#   socketio      Socket.IO 4 on Node (npm), peers/socketio/
#   sockudo       a Pusher-protocol server (crates.io), memory adapter
#   gorilla       gorilla/websocket's chat hub (Debian), peers/gorilla/
#
#   scripts/peers.sh              # 10,000 connections, a burst of 100
#   scripts/peers.sh 2000 20      # N connections, a burst of M
#   SERVERS="gale sockudo" scripts/peers.sh
#   PACED=100 RATE=10             # the paced run: P publications at R/s
#   PEERS_NO_BUILD=1              # use what is built already
#   GALE=/tmp/gale-old            # another gale build as the server "gale"
#   PROCS=2                       # the client in 2 processes
#
# For each server in turn: start it fresh on a free port, have
# `gale-peers client` open N connections (from 127.0.0.2..5) and
# subscribe each to "bench", then measure
#   idle      the server's VmRSS growth per held connection;
#   burst     M publications of 1 KB back to back (each waits for its
#             HTTP answer): deliveries/s from the first publish to the
#             last delivery, and the server's CPU (utime + stime, all
#             threads) per delivery;
#   paced     P publications at R/s, each stamped: publish-to-delivery
#             latency over every delivery;
# print one row of a markdown table, and stop it. The client shares this
# machine's cores with the server. Traffic stays on 127.0.0.0/8; every
# process started here is stopped on exit. Logs: target/peers/.
#
# Installs what is missing: golang-go, golang-github-gorilla-websocket-dev
# and protobuf-compiler (apt-get), peers/socketio's packages (npm ci), peers/ (cargo build),
# sockudo (cargo install --locked, into peers/target/sockudo; it builds
# for a long while the first time), and gale (cargo build --release).
# Builds run under `nice`; set CARGO_BUILD_JOBS=1 on a small shared box.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${1:-10000}"
M="${2:-100}"
PACED="${PACED:-100}"
RATE="${RATE:-10}"
SERVERS="${SERVERS:-gale socketioxide socketio sockudo gorilla}"
SOCKUDO_VERSION="${SOCKUDO_VERSION:-5.2.0}"
ROOT="$PWD"
PEERS="$ROOT/peers"
OUT="$ROOT/target/peers"
GALE="${GALE:-$ROOT/target/release/gale}"
CLIENT="$PEERS/target/release/gale-peers"
SOCKUDO="$PEERS/target/sockudo/bin/sockudo"
GORILLA="$PEERS/target/gorilla/gorilla-hub"
KEY="peers-bench-key-0123456789"
PUSHER_APP="gale-peers"
PUSHER_KEY="gale-peers-key"
PUSHER_SECRET="gale-peers-secret"

PID=""
cleanup() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

. scripts/ports.sh

# --- install and build -------------------------------------------------
install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  # protoc: sockudo's metrics-exporter-tcp compiles a .proto at build time.
  if ! command -v go >/dev/null || ! command -v protoc >/dev/null ||
    [ ! -d /usr/share/gocode/src/github.com/gorilla/websocket ]; then
    echo "== apt-get install golang-go golang-github-gorilla-websocket-dev protobuf-compiler" >&2
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
      golang-go golang-github-gorilla-websocket-dev protobuf-compiler
  fi
  echo "== gorilla hub (go build, GOPATH mode against /usr/share/gocode)" >&2
  mkdir -p "$PEERS/target/gorilla"
  (cd "$PEERS/gorilla" && GO111MODULE=off GOPATH=/usr/share/gocode \
    GOCACHE="$PEERS/target/gorilla/cache" nice -n 19 go build -o "$GORILLA" .)

  echo "== socket.io (npm ci)" >&2
  (cd "$PEERS/socketio" && nice -n 19 npm ci --no-audit --no-fund --loglevel=error)

  echo "== peers/ (cargo build --release)" >&2
  (cd "$PEERS" && nice -n 19 cargo build --release --quiet)

  if [ ! -x "$SOCKUDO" ] || ! "$SOCKUDO" --version 2>/dev/null | grep -q "$SOCKUDO_VERSION"; then
    echo "== sockudo $SOCKUDO_VERSION (cargo install --locked; long the first time)" >&2
    nice -n 19 cargo install --locked --quiet sockudo --version "$SOCKUDO_VERSION" \
      --root "$PEERS/target/sockudo" --target-dir "$PEERS/target/sockudo-build"
  fi

  echo "== gale (cargo build --release)" >&2
  nice -n 19 cargo build --release --quiet
}
[ -n "${PEERS_NO_BUILD:-}" ] || install

ulimit -n 20000
if [ "$N" -gt 19000 ]; then
  echo "N=$N: at most 19000 (each server is one process, 20,000 open files)" >&2
  exit 2
fi

# --- the servers ----------------------------------------------------------
# start_NAME PORT DIR: starts the server in the background, sets PID.
start_gale() {
  GALE_SERVER__LISTEN="127.0.0.1:$1" GALE_SERVER__MAX_CONNECTIONS=20000 \
    GALE_SERVER__MAX_CONNECTIONS_PER_IP=0 GALE_API__KEY="$KEY" \
    GALE_STORE__URL="sqlite://$2/gale.db" GALE_STORE__SPILL_DIR="$2/spill" RUST_LOG=warn \
    "$GALE" serve --config scripts/bench.toml >"$2/server.log" 2>&1 &
  PID=$!
}
start_socketioxide() {
  "$CLIENT" socketioxide "127.0.0.1:$1" >"$2/server.log" 2>&1 &
  PID=$!
}
start_socketio() {
  (cd "$PEERS/socketio" && NODE_ENV=production HOST=127.0.0.1 PORT="$1" \
    exec node server.js) >"$2/server.log" 2>&1 &
  PID=$!
}
# Defaults but for the limits of the default app (100 connections, 100
# backend events/s) and the per-address rate limits (20 WebSocket
# connections and 100 API calls a minute), which a benchmark from four
# addresses would hit at once. Adapter, cache, queue and app manager in
# memory: no external services.
start_sockudo() {
  (cd "$2" && HOST=127.0.0.1 PORT="$1" \
    METRICS_HOST=127.0.0.1 METRICS_PORT="$(free_port)" \
    ADAPTER_DRIVER=local CACHE_DRIVER=memory QUEUE_DRIVER=memory APP_MANAGER_DRIVER=memory \
    RATE_LIMITER_ENABLED=false \
    SOCKUDO_DEFAULT_APP_ID="$PUSHER_APP" SOCKUDO_DEFAULT_APP_KEY="$PUSHER_KEY" \
    SOCKUDO_DEFAULT_APP_SECRET="$PUSHER_SECRET" SOCKUDO_DEFAULT_APP_ENABLED=true \
    SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=$((N + 1000)) \
    SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=1000000 \
    exec "$SOCKUDO") >"$2/server.log" 2>&1 &
  PID=$!
}
start_gorilla() {
  "$GORILLA" -addr "127.0.0.1:$1" >"$2/server.log" 2>&1 &
  PID=$!
}

# The client's protocol and the name in the table, per server.
proto_of() {
  case "$1" in
    gale) echo gale ;;
    socketioxide | socketio) echo socketio ;;
    sockudo) echo pusher ;;
    gorilla) echo raw ;;
  esac
}
name_of() {
  case "$1" in
    gale) echo "gale" ;;
    socketioxide) echo "socketioxide" ;;
    socketio) echo "Socket.IO 4 (Node $(node --version 2>/dev/null || echo ?))" ;;
    sockudo) echo "sockudo $SOCKUDO_VERSION" ;;
    gorilla) echo "gorilla/websocket hub" ;;
  esac
}

run() {
  local s="$1" dir="$OUT/$1" port
  rm -rf "$dir" && mkdir -p "$dir"
  port=$(free_port)
  "start_$s" "$port" "$dir"
  if ! wait_port "$port"; then
    echo "| $(name_of "$s") | did not start: see $dir/server.log | | | | |"
    cleanup
    PID=""
    return
  fi
  sleep 0.5
  "$CLIENT" client --proto "$(proto_of "$s")" --server "127.0.0.1:$port" \
    --name "$(name_of "$s")" -n "$N" -m "$M" --paced "$PACED" --rate "$RATE" \
    --server-pid "$PID" --api-key "$KEY" --procs "${PROCS:-1}" \
    --pusher "$PUSHER_APP:$PUSHER_KEY:$PUSHER_SECRET" 2>"$dir/client.log" ||
    echo "| $(name_of "$s") | failed: see $dir/client.log | | | | |"
  sed 's/^/    /' "$dir/client.log" >&2
  cleanup
  PID=""
}

echo
echo "$N connections; burst of $M publications of 1 KB; paced: $PACED at $RATE/s"
echo
echo "| server | idle KiB/conn | burst deliveries/s | µs server CPU/delivery | paced p50 / p99 / p99.9 / max ms | missed |"
echo "|---|---:|---:|---:|---:|---:|"
for s in $SERVERS; do
  case "$s" in
    gale | socketioxide | socketio | sockudo | gorilla) run "$s" ;;
    *) echo "unknown server: $s (gale, socketioxide, socketio, sockudo, gorilla)" >&2; exit 2 ;;
  esac
done
