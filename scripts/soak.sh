#!/usr/bin/env bash
# Soak: mixed load against one `gale serve` for a fixed time, sampling the
# server's RSS every 10 s. Prints an ASCII chart of the curve and the
# slope after warm-up (a least-squares line over the samples after the
# first quarter), and exits 1 if RSS grows by more than 1 MiB per 10
# minutes after warm-up. Traffic stays on 127.0.0.0/8; every phase ends
# by itself.
#
# The load repeats, in parallel, until the time is up:
#   - requests: 300 connections asking cities and JSON events for 20 s,
#     then disconnecting (connect/disconnect churn, the request log);
#   - broadcast: 1,000 subscribers, 40 publishes of 1 KB at 10/s, some
#     over permessage-deflate (subscriptions, pushes);
#   - connections: 2,000 connections held 5 s, then closed (churn).
#
#   scripts/soak.sh            # 30 minutes
#   scripts/soak.sh 300        # 5 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-1800}
cargo build --release --quiet
gale=./target/release/gale
tmp=$(mktemp -d)
port=9480
up=9481
key=soak-key-0123456789abcdef
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

"$gale" fake-upstream --listen "127.0.0.1:$up" 2>/dev/null & pids+=($!)
GALE_SERVER__LISTEN="127.0.0.1:$port" GALE_API__KEY=$key \
GALE_WEATHER__PROVIDER=openweathermap GALE_WEATHER__API_KEY=k \
GALE_WEATHER__BASE_URL="http://127.0.0.1:$up" GALE_STORE__URL="sqlite://$tmp/soak.db" GALE_STORE__SPILL_DIR="$tmp/spill" \
RUST_LOG=warn "$gale" serve --config scripts/bench.toml 2>"$tmp/server.log" & pids+=($!); server=$!
sleep 1
url="ws://127.0.0.1:$port/ws"
end=$(( $(date +%s) + secs ))

loop() { # runs "$@" until the end, counting failures
  local fails=0
  while [ "$(date +%s)" -lt "$end" ]; do
    "$@" >/dev/null 2>&1 || fails=$((fails + 1))
  done
  echo "$fails"
}
loop "$gale" bench requests "$url" -n 300 -d 20 --cities 2000 --sources 2 >"$tmp/requests.fails" & pids+=($!)
loop "$gale" bench requests "$url" -n 100 -d 20 --events --sources 2 >"$tmp/events.fails" & pids+=($!)
loop "$gale" bench broadcast "$url" -n 1000 -m 40 --rate 10 --api-key $key --sources 2 >"$tmp/broadcast.fails" & pids+=($!)
loop "$gale" bench broadcast "$url" -n 300 -m 40 --rate 10 --api-key $key --deflate --topic soak-z >"$tmp/deflate.fails" & pids+=($!)
loop "$gale" bench connections "$url" -n 2000 --hold 5 --sources 4 >"$tmp/connections.fails" & pids+=($!)

echo "soak: ${secs}s of mixed load against gale (pid $server); RSS every 10 s"
samples=()
while [ "$(date +%s)" -lt "$end" ]; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
  samples+=("$rss")
  sleep 10
done
wait "${pids[@]:2}" 2>/dev/null || true
rss=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
samples+=("$rss")
alive=$(kill -0 "$server" 2>/dev/null && echo yes || echo NO)
fails="requests $(cat "$tmp/requests.fails"), events $(cat "$tmp/events.fails"), broadcast $(cat "$tmp/broadcast.fails"), deflate $(cat "$tmp/deflate.fails"), connections $(cat "$tmp/connections.fails")"
metrics=$(curl -s "127.0.0.1:$port/metrics.json" || echo '{}')

mkdir -p target/soak
printf '%s\n' "${samples[@]}" >target/soak/rss-kib.txt
echo "samples (KiB, every 10 s): target/soak/rss-kib.txt"
python3 - target/soak/rss-kib.txt "$alive" "$fails" "$metrics" <<'PY'
import json, sys
rss = [int(l) / 1024 for l in open(sys.argv[1]) if l.strip()]
alive, fails, metrics = sys.argv[2], sys.argv[3], sys.argv[4]
n = len(rss)
lo, hi = min(rss), max(rss)
rows = 12
print("RSS (MiB) over time, one column per 10 s sample (compressed to 60 columns):")
step = max(1, -(-n // 60))
cols = [max(rss[i:i + step]) for i in range(0, n, step)]
for r in range(rows, 0, -1):
    level = lo + (hi - lo) * (r - 0.5) / rows
    label = "%7.1f |" % (lo + (hi - lo) * r / rows)
    print(label + "".join("#" if c >= level else " " for c in cols))
print("        +" + "-" * len(cols))
print("         0 s%s%d s" % (" " * max(1, len(cols) - 8), (n - 1) * 10))
warm = n // 4
xs = list(range(warm, n))
ys = rss[warm:]
if len(xs) >= 2:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
else:
    slope = 0.0
per_10min = slope * 60  # samples are 10 s apart
half = rss[n // 2:]
hx = list(range(len(half)))
if len(hx) >= 2:
    hmx, hmy = sum(hx) / len(hx), sum(half) / len(half)
    half_slope = sum((x - hmx) * (y - hmy) for x, y in zip(hx, half)) / sum((x - hmx) ** 2 for x in hx) * 60
else:
    half_slope = 0.0
try:
    m = json.loads(metrics)
except ValueError:
    m = {}
print("samples %d, RSS min %.1f / max %.1f / last %.1f MiB" % (n, lo, hi, rss[-1]))
print("slope after warm-up (last 3/4): %+.3f MiB per 10 min (the verdict's rule)" % per_10min)
print("slope over the last half, for reference: %+.3f MiB per 10 min" % half_slope)
print("server alive: %s; load runs that failed: %s" % (alive, fails))
print("server counted: requests %s, connections now %s" % (m.get("requests"), m.get("connections")))
ok = alive == "yes" and per_10min <= 1.0
print("verdict: %s" % ("no growth after warm-up" if ok else "GROWTH or failure"))
sys.exit(0 if ok else 1)
PY
