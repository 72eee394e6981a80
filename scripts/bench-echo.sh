#!/usr/bin/env bash
# Benchmark 3 of docs/benchmarks.md, in one run on this machine:
# replies/s and p99 for 1,000 closed-loop connections against
#   (a) gale's /echo, (b) gale's /ws answered from the weather cache,
#   and the bare echo examples of the candidate crates (peers/).
# Usage: scripts/bench-echo.sh [CONNECTIONS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
secs=${2:-10}
cargo build --release --quiet
cargo build --release --quiet --manifest-path peers/Cargo.toml
# GALE_BIN runs another build of gale (e.g. the previous commit's) the same way.
gale=${GALE_BIN:-./target/release/gale}
peers=./peers/target/release/gale-peers
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

"$gale" fake-upstream --listen 127.0.0.1:9391 2>/dev/null & pids+=($!)
# Small read buffers like gale's (memory per connection) would be the
# fair set-up for the peers too, but each runs as its own example does.
GALE_SERVER__ECHO=true GALE_SERVER__LISTEN=127.0.0.1:9390 \
GALE_WEATHER__PROVIDER=openweathermap GALE_WEATHER__API_KEY=k \
GALE_WEATHER__BASE_URL=http://127.0.0.1:9391 GALE_STORE__URL="sqlite://$tmp/bench.db" GALE_STORE__SPILL_DIR="$tmp/spill" \
RUST_LOG=warn "$gale" serve 2>"$tmp/server.log" & pids+=($!); gale_pid=$!
"$peers" axum 127.0.0.1:9392 2>/dev/null & pids+=($!); axum_pid=$!
"$peers" fastwebsockets 127.0.0.1:9393 2>/dev/null & pids+=($!); fws_pid=$!
"$peers" tokio-websockets 127.0.0.1:9394 2>/dev/null & pids+=($!); tws_pid=$!
sleep 1

# Warm the cache: the 100 cities the weather run asks for.
"$gale" bench requests ws://127.0.0.1:9390/ws -n 100 --per-connection 1 --cities 100 -d 5 --json >/dev/null

run() { # name url pid mode
  local out
  out=$("$gale" bench requests "$2" -n "$n" -d "$secs" --cities 100 --connect-rate 5000 \
        --server-pid "$3" $4 --json)
  python3 -c 'import json,sys
r=json.loads(sys.argv[2])
err=sum(r["errors"].values())
print("%-28s %10.0f %8.2f %8.2f %6d %9.0f%% %9.2f %8.0f%%" % (sys.argv[1], r["rate_per_s"],
  r["latency_ms"]["p50"], r["latency_ms"]["p99"], err, r.get("server_cpu_percent", 0),
  r.get("server_cpu_us_per_reply", 0), r["generator_cpu_percent"]))' "$1" "$out"
}
# The generator shares the machine's cores with the server: replies/s is
# capped by both, while server CPU per reply is the server's own cost.
printf '%-28s %10s %8s %8s %6s %10s %9s %9s\n' target replies/s p50_ms p99_ms errors server_cpu us/reply gen_cpu
run "gale /echo"                 ws://127.0.0.1:9390/echo "$gale_pid" --echo
run "gale /ws weather (cached)"  ws://127.0.0.1:9390/ws   "$gale_pid" ""
run "axum (tungstenite) echo"    ws://127.0.0.1:9392/     "$axum_pid" --echo
run "fastwebsockets echo"        ws://127.0.0.1:9393/     "$fws_pid"  --echo
run "tokio-websockets echo"      ws://127.0.0.1:9394/     "$tws_pid"  --echo
echo "server warnings: $(grep -c WARN "$tmp/server.log" || true) (request-log rows dropped: $(curl -s http://127.0.0.1:9390/metrics.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["db-dropped"])'))"
