#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient against gale's /echo, which
# shares its whole connection stack with /ws. Installs the suite into a
# Python 2.7 virtualenv under target/ on first use. Prints a summary by
# outcome; exits 1 if any case FAILED. Traffic stays on 127.0.0.1.
#
#   scripts/autobahn.sh            # all cases
#   CASES='["1.*","2.*"]' scripts/autobahn.sh
#   TLS=1 scripts/autobahn.sh      # over wss:// (gale's own TLS, the test
#                                  # certificate in tests/keys)
set -euo pipefail
cd "$(dirname "$0")/.."

PY27="${PY27:-$HOME/.pyenv/versions/2.7.18/bin/python}"
VENV="${AUTOBAHN_VENV:-$PWD/target/autobahn-venv}"
OUT="$PWD/target/autobahn"
PORT="${PORT:-9001}"
CASES="${CASES:-[\"*\"]}"

if [ ! -x "$VENV/bin/wstest" ]; then
  echo "installing autobahntestsuite into $VENV"
  "$PY27" -m pip install -q virtualenv
  "$PY27" -m virtualenv -q "$VENV"
  "$VENV/bin/pip" install -q autobahntestsuite
fi

cargo build --release --quiet
rm -rf "$OUT" && mkdir -p "$OUT"
SCHEME=ws
if [ -n "${TLS:-}" ]; then
  export GALE_SERVER__TLS_CERT="$PWD/tests/keys/tls-cert.pem" GALE_SERVER__TLS_KEY="$PWD/tests/keys/tls-key.pem"
  SCHEME=wss
fi
# 16 MiB messages: the suite's largest (case 9.x) must fit.
GALE_SERVER__ECHO=true GALE_SERVER__LISTEN="127.0.0.1:$PORT" \
GALE_SERVER__MAX_MESSAGE_BYTES=16777216 GALE_STORE__URL="sqlite://$OUT/gale.db" GALE_STORE__SPILL_DIR="$OUT/spill" \
RUST_LOG=warn target/release/gale serve &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

cat > "$OUT/fuzzingclient.json" <<JSON
{
  "outdir": "$OUT/reports",
  "servers": [{"agent": "gale", "url": "$SCHEME://127.0.0.1:$PORT/echo"}],
  "cases": $CASES,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
(cd "$OUT" && "$VENV/bin/wstest" -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1)

python3 - "$OUT/reports/index.json" "$SCHEME://" <<'PY'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["gale"]
by = collections.Counter(c["behavior"] for c in cases.values())
close = collections.Counter(c["behaviorClose"] for c in cases.values())
print("Autobahn|Testsuite fuzzingclient against /echo (%s): %d cases" % (sys.argv[2], len(cases)))
for k in ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"):
    print("  %-14s %d" % (k, by.get(k, 0)))
print("  close behaviour: " + ", ".join("%s %d" % kv for kv in sorted(close.items())))
failed = sorted((k for k, c in cases.items() if c["behavior"] == "FAILED" or c["behaviorClose"] == "FAILED"),
                key=lambda s: [int(x) for x in s.split(".")])
if failed:
    print("FAILED: " + " ".join(failed))
    sys.exit(1)
PY
