#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for a fixed budget on
# the nightly toolchain, growing the corpus under fuzz/corpus/, and prints
# executions and findings per target. Not part of CI. Installs cargo-fuzz
# on first use. A crash leaves its input under fuzz/artifacts/TARGET/:
# turn it into a regression test, then fix.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600 frames # 10 minutes of one target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(protocol frames deflate config handshake)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -O >/dev/null
printf '%-10s %12s %10s %8s %s\n' target executions exec/s corpus findings
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" \
       -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    found=none
  else
    found="CRASH: $(ls -t "artifacts/$t" 2>/dev/null | head -n1)"
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  rate=$(( runs / (secs > 0 ? secs : 1) ))
  printf '%-10s %12s %10s %8s %s\n' "$t" "$runs" "$rate" "$(ls "corpus/$t" | wc -l)" "$found"
  rm -f "$log"
done
exit $status
