#!/usr/bin/env bash
# A soak: tollgate under full load for a long time, sampled every few seconds, to show that
# resident memory, disk and throughput level off instead of creeping (issue 10). Prints a
# Markdown table (also written to target/soak/results.md).
#
#   scripts/soak.sh                               # 10 minutes, strict, 8 x 32 callers
#   SOAK_SECONDS=60 SOAK_DURABILITY=relaxed scripts/soak.sh
#
# How, and why so:
# - One release server on a free loopback port, `examples/load-policy.toml` (every limit set,
#   none reached), default bounds: the only thing that changes over the run is how much state
#   the server keeps, which is what a soak is for.
# - The load is examples/load.rs: C connections x S streams, each a loop of Reserve then Commit
#   (the pattern of real callers), spread over SOAK_SUBJECTS subjects. Every Commit leaves a
#   settled reservation kept 24 h for retries, so memory grows until the settled-record bound
#   (2,000,000, oldest first) is reached and must stay flat after it.
# - Every SOAK_INTERVAL seconds: the server's VmRSS, the size of its data directory, the
#   records and scopes in memory (gauges), and Reserve+Commit answered OK in the interval (from
#   the server's own rpc histogram counts, so errors are not counted as throughput).
# - The summary compares the second half of the run with the first (after a warm-up of one
#   fifth): throughput and RSS should not drift once the bounds are reached.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

secs=${SOAK_SECONDS:-600}
interval=${SOAK_INTERVAL:-10}
durability=${SOAK_DURABILITY:-strict}
subjects=${SOAK_SUBJECTS:-100000}
shape=${SOAK_SHAPE:-8x32}
for v in secs interval subjects; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]] || ((${!v} < 1)); then
    echo "soak: $v must be a positive whole number (got '${!v}')" >&2
    exit 2
  fi
done
((secs <= 3600)) || { echo "soak: SOAK_SECONDS is at most 3600" >&2; exit 2; }
[[ $shape =~ ^([0-9]+)x([0-9]+)$ ]] || { echo "soak: SOAK_SHAPE is CxS, e.g. 8x32" >&2; exit 2; }
connections=${BASH_REMATCH[1]}
streams=${BASH_REMATCH[2]}
case $durability in strict | relaxed) ;; *) echo "soak: SOAK_DURABILITY is strict or relaxed" >&2; exit 2 ;; esac
for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "soak: $tool is required" >&2; exit 1; }
done

target_dir=${CARGO_TARGET_DIR:-target}
out_dir=$target_dir/soak
mkdir -p "$out_dir"
cargo build --release --bin tollgate --example load
bin=$target_dir/release/tollgate
load_tool=$target_dir/release/examples/load

work=$(mktemp -d)
server_pid=""
load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" --policy examples/load-policy.toml \
  --durability "$durability" --metrics-listen "127.0.0.1:$metrics_port" \
  >"$out_dir/server.out" 2>"$out_dir/server.err" &
server_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^tollgate listening on \([0-9.:]*\).*/\1/p' "$out_dir/server.out")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$out_dir/server.err" >&2; echo "soak: server did not start" >&2; exit 1; }
for _ in $(seq 1 100); do
  curl -sf --max-time 2 "http://127.0.0.1:$metrics_port/metrics" >/dev/null && break
  sleep 0.1
done

# Prints "ok_calls reservations scopes": Reserve and Commit answered OK so far, and the gauges.
sample_metrics() {
  curl -sf --max-time 5 "http://127.0.0.1:$metrics_port/metrics" | awk '
    /^tollgate_rpc_duration_seconds_count\{/ && /code="OK"/ &&
      (/method="Reserve"/ || /method="Commit"/) { ok += $NF }
    /^tollgate_reservations / { r = $NF }
    /^tollgate_scopes / { s = $NF }
    END { printf "%d %d %d\n", ok, r, s }'
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$server_pid/status"; }

"$load_tool" --target "http://$addr" --connections "$connections" --streams "$streams" \
  --duration "$secs" --warmup 0 --subjects "$subjects" --rotate-subjects --server-pid "$server_pid" \
  >"$out_dir/load.out" 2>"$out_dir/load.err" &
load_pid=$!

samples=$work/samples.tsv
: >"$samples"
read -r last_ok _ _ < <(sample_metrics)
start=$(date +%s.%N)
last_t=$start
next=$interval
while kill -0 "$load_pid" 2>/dev/null; do
  now=$(date +%s.%N)
  wait_s=$(awk -v s="$start" -v n="$now" -v x="$next" 'BEGIN { w = s + x - n; print (w > 0 ? w : 0) }')
  sleep "$wait_s"
  kill -0 "$load_pid" 2>/dev/null || break
  kill -0 "$server_pid" 2>/dev/null || { echo "soak: the server died" >&2; cat "$out_dir/server.err" >&2; exit 1; }
  read -r ok recs scopes < <(sample_metrics)
  t=$(date +%s.%N)
  disk=$(du -sk "$work/data" | awk '{ print $1 }')
  awk -v t="$t" -v s="$start" -v lt="$last_t" -v ok="$ok" -v lok="$last_ok" -v rss="$(rss_kib)" \
    -v disk="$disk" -v r="$recs" -v sc="$scopes" 'BEGIN {
      printf "%.0f\t%.0f\t%.1f\t%.1f\t%d\t%d\n", t - s, (ok - lok) / (t - lt), rss / 1024, disk / 1024, r, sc
    }' >>"$samples"
  last_ok=$ok
  last_t=$t
  next=$((next + interval))
done
wait "$load_pid" || { cat "$out_dir/load.err" >&2; echo "soak: the load client failed" >&2; exit 1; }
load_pid=""

{
  echo "Soak: \`SOAK_SECONDS=$secs SOAK_DURABILITY=$durability SOAK_SHAPE=$shape SOAK_SUBJECTS=$subjects scripts/soak.sh\`"
  echo "($(nproc) cores, $(date -u +%Y-%m-%d), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
  echo
  echo "| t (s) | Reserve+Commit answered OK /s | server RSS (MiB) | data dir (MiB) | reservations in memory | scopes |"
  echo "|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$samples"
  echo
  awk -F'\t' -v secs="$secs" '
    $1 > secs / 5 && $1 <= (secs / 5 + secs) / 2 { n1++; q1 += $2; if ($3 > r1) r1 = $3 }
    $1 > (secs / 5 + secs) / 2 { n2++; q2 += $2; if ($3 > r2) r2 = $3; rl = $3 }
    END {
      if (n1 && n2)
        printf "After a warm-up of %d s: first half %.0f calls/s, peak RSS %.1f MiB; second half %.0f calls/s (%+.1f %%), peak RSS %.1f MiB, last %.1f MiB.\n",
          secs / 5, q1 / n1, r1, q2 / n2, (q2 / n2 - q1 / n1) * 100 / (q1 / n1), r2, rl
    }' "$samples"
  echo
  echo "Load client's summary:"
  echo
  echo '```'
  cat "$out_dir/load.out"
  echo '```'
} | tee "$out_dir/results.md"
