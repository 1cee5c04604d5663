#!/usr/bin/env bash
# rss-sample.sh OUT CMD...: runs CMD and samples its resident memory every 0.1 s into OUT
# (seconds since start, anonymous MB, file-backed MB), then appends a last line
# "# peak anon A MB, file F MB". Exits with CMD's status. Anonymous memory is what the
# command allocated; file-backed is mapped files it touched (an on-disk index's pages):
# /usr/bin/time's peak is their sum at the worst moment, this says which.
set -uo pipefail
out=$1; shift
"$@" &
pid=$!
t0=$(date +%s%N)
: > "$out"
while kill -0 "$pid" 2>/dev/null; do
    s=$(awk '/^RssAnon/{a=int($2/1024)} /^RssFile/{f=int($2/1024)} END{if (a != "") print a, f}' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$s" ] && printf '%d.%d %s\n' $(( ($(date +%s%N) - t0) / 1000000000 )) $(( ($(date +%s%N) - t0) / 100000000 % 10 )) "$s" >> "$out"
    sleep 0.1
done
wait "$pid"
rc=$?
awk '{if ($2 > a) a = $2; if ($3 > f) f = $3} END {printf "# peak anon %d MB, file %d MB\n", a, f}' "$out" >> "$out"
exit "$rc"
