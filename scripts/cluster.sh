#!/usr/bin/env bash
# Starts N gale nodes on consecutive ports (8081, 8082, …) as one cluster
# over Redis, with a fake weather API, until Ctrl-C.
#
#   scripts/cluster.sh 3                       # Redis at redis://127.0.0.1:6379
#   REDIS_URL=redis://10.0.0.5:6379 scripts/cluster.sh 2
#   BASE_PORT=9000 scripts/cluster.sh 6
#   CONFIG=scripts/bench.toml scripts/cluster.sh 6   # each node with a config file
#
# Then, e.g.: gale client ws://127.0.0.1:8081/ws and
# gale client ws://127.0.0.1:8082/ws; see docs/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-3}"
redis="${REDIS_URL:-redis://127.0.0.1:6379}"
base="${BASE_PORT:-8081}"
prefix="${PREFIX:-gale}"
bin="${GALE_BIN:-target/release/gale}"

[ -x "$bin" ] || cargo build --release
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM

"$bin" fake-upstream --listen 127.0.0.1:8079 >/dev/null 2>&1 &
pids+=($!)
for i in $(seq 1 "$n"); do
  port=$((base + i - 1))
  mkdir -p "target/cluster/node$i"
  GALE_CLUSTER__REDIS_URL="$redis" \
  GALE_CLUSTER__NODE_ID="node$i" \
  GALE_CLUSTER__PREFIX="$prefix" \
  GALE_WEATHER__BASE_URL="http://127.0.0.1:8079" \
  GALE_API__KEY="${GALE_API__KEY:-cluster-demo-key-0123}" \
  GALE_STORE__URL="${STORE_URL:-sqlite://target/cluster/node$i/gale.db}" \
  GALE_STORE__SPILL_DIR="target/cluster/node$i/spill" \
    "$bin" serve ${CONFIG:+--config "$CONFIG"} --listen "127.0.0.1:$port" &
  pids+=($!)
  echo "node$i: ws://127.0.0.1:$port/ws"
done
echo "fake weather API: http://127.0.0.1:8079; publish key: ${GALE_API__KEY:-cluster-demo-key-0123}"
wait
