#!/usr/bin/env bash
# Long fuzz runs of the decoders (issue 21, part 6). Not a test: run by hand.
#
#   bench/fuzz.sh SECONDS TARGET [TARGET ...]
#
# Runs the targets two at a time (PAR=N for another number; nice 19, so other work on the machine keeps priority),
# each for SECONDS, from the corpus in fuzz/corpus/TARGET plus what earlier long runs found
# (fuzz/target/long-corpus/TARGET, not committed). Prints one row per target for
# bench/RESULTS.md: seconds, executions, per second, new units, peak RSS, and whether
# anything crashed, leaked or timed out. Then merges each long-run corpus into the committed
# one at max_len 2048 (what the suite's replay reads). Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=$1; shift
targets=("$@")
out=../bench/results/fuzz
mkdir -p "$out" target/long-corpus
cargo +nightly fuzz build >/dev/null
bin=target/x86_64-unknown-linux-gnu/release

run() {
  local t=$1
  mkdir -p "target/long-corpus/$t" "artifacts/$t"
  local rc=0
  nice -n 19 "$bin/$t" "target/long-corpus/$t" "corpus/$t" \
    -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=20 -artifact_prefix="artifacts/$t/" \
    -print_final_stats=1 >"$out/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$out/$t.rc"
  # The log keeps what a reader needs (setup, findings, final stats), not a progress line
  # per new unit (megabytes over half an hour).
  grep -vE '^#[0-9]+' "$out/$t.log" >"$out/$t.log.trim" || true
  mv "$out/$t.log.trim" "$out/$t.log"
}

# PAR targets at a time (default 2, one per core).
par=${PAR:-2}
while [ $# -gt 0 ]; do
  for _ in $(seq "$par"); do
    [ $# -gt 0 ] || break
    run "$1" &
    shift
  done
  wait
done

echo "| target | seconds | executions | per second | new units | peak RSS, MB | crashes, leaks, timeouts |"
echo "|---|---|---|---|---|---|---|"
for t in "${targets[@]}"; do
  log=$out/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  units=$(sed -n 's/^stat::new_units_added: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  found=none
  if [ "$(cat "$out/$t.rc")" != 0 ] || grep -qE 'ERROR: libFuzzer|==ERROR|SUMMARY:' "$log"; then
    found="see $t.log"
  fi
  echo "| $t | $secs | $execs | $speed | $units | $rss | $found |"
done

for t in "${targets[@]}"; do
  nice -n 19 "$bin/$t" -merge=1 -max_len=2048 "corpus/$t" "target/long-corpus/$t" \
    >"$out/$t.merge.log" 2>&1 || true
done
du -sh corpus
