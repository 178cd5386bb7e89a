#!/usr/bin/env bash
# Benchmarks tollgate through gRPC on loopback and prints a Markdown table (also written to
# target/bench/results.md): req/s and p50/p99/p99.9 latency of each call, beside those of
# grpc.health.v1.Health/Check measured on the same server just before, and their ratio.
#
#   scripts/bench.sh                    # about 8 minutes: each run 5 s measured after 1 s warm-up
#   BENCH_SECONDS=1 scripts/bench.sh    # about 3 minutes, noisy: to check the script itself
#   BENCH_STORES=sled scripts/bench.sh  # sled only (default: "sled postgres")
#
# How, and why so:
# - The stores side by side in one run: every call on sled; on PostgreSQL (a server of its own,
#   scripts/lib/postgres.sh, fsync and synchronous_commit on) the calls that write (Reserve, and
#   Reserve+Commit pairs): the others never touch the store. PostgreSQL's own CPU is not in the
#   server CPU column, which counts tollgate's.
# - One server per store and durability (strict, relaxed), on a free loopback port, with a policy no run
#   can reach (every limit set, so every check runs; every Reserve ALLOWED). Reserves hold for
#   1 ms: each hold is expired by the next calls (and charged), so a flood has somewhere to go.
# - h2load (a C client, cheap per call) sends one fixed body per call, written from proto/'s
#   types by examples/grpc_body.rs. Shapes are connections x streams per connection.
# - Health/Check runs right before each call's run, same shape, same server: the ratio compares
#   adjacent runs, so the machine's drifting load weighs on both.
# - h2load counts a gRPC error as HTTP 200, so answers are checked through the server's metrics:
#   no call may end with another code than OK, no Reserve may be denied or downgraded, and the
#   OK answers must cover every request h2load saw succeed. One request of each body is first
#   sent with curl and its answer decoded (grpc-status 0; Reserve: decision ALLOWED; Health:
#   SERVING), which covers dry runs and Health, which the metrics do not count.
# - h2load prints no percentiles: they come from its per-request log.
# - Reserve+Commit pairs run through examples/load.rs (a tonic client), which reports its own
#   CPU time per call beside the server's: client and server share the machine's cores.
#
# Needs h2load (Debian's nghttp2-client, installed here if missing), curl and python3 (to pick
# a free port for the metrics listener).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

secs=${BENCH_SECONDS:-5}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1 || secs > 600)); then
  echo "BENCH_SECONDS must be whole seconds from 1 to 600 (got '$secs')" >&2
  exit 2
fi
# Warm-up before each measured run: enough for the connections to open and the tokenizer of a
# text prompt to load; shorter in quick mode.
if ((secs >= 2)); then warmup_ms=1000; else warmup_ms=500; fi
shapes=(1x1 8x32 64x16)
pair_shapes=(1x1 8x32)
target_dir=${CARGO_TARGET_DIR:-target}
out_dir=$target_dir/bench
command_line="scripts/bench.sh"
[ -n "${BENCH_SECONDS:-}" ] && command_line="BENCH_SECONDS=$secs scripts/bench.sh"

fail() {
  echo "bench: FAILED: $*" >&2
  exit 1
}

# --- Tools.
if ! command -v h2load >/dev/null; then
  echo "h2load not found: installing Debian's nghttp2-client" >&2
  sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y nghttp2-client
fi
for tool in curl python3 timeout; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done
stores=${BENCH_STORES:-sled postgres}
for store in $stores; do
  [[ $store == sled || $store == postgres ]] || fail "BENCH_STORES: sled or postgres (got '$store')"
done
[ -n "${BENCH_STORES:-}" ] && command_line="BENCH_STORES='$stores' $command_line"
# shellcheck source=scripts/lib/postgres.sh
source scripts/lib/postgres.sh

cargo build --release --bin tollgate --example grpc_body --example load
bin=$target_dir/release/tollgate
body_tool=$target_dir/release/examples/grpc_body
load_tool=$target_dir/release/examples/load

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  pg_stop "$out_dir/raw/postgres.log"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$out_dir/raw"
rm -f "$out_dir"/raw/*
results=$work/results.tsv
pairs=$work/pairs.tsv
: >"$results"
: >"$pairs"

# --- The policy: every limit set, none reachable in a run (10^15 is the ceiling of a limit).
cat >"$work/policy.toml" <<'EOF'
default_tier = "bench"

[tiers.bench]
tokens_per_minute = 1000000000000000
requests_per_minute = 1000000000000000
tokens_per_day = 1000000000000000
tokens_per_month = 1000000000000000
max_concurrent = 1000000
usd_per_day = 1000000000.0
usd_per_month = 1000000000.0

[global]
tokens_per_minute = 1000000000000000
requests_per_minute = 1000000000000000

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0
EOF

# --- The request bodies. Reserves carry no idempotency key: every request is the same bytes,
# and with a key all but the first would be replays.
"$body_tool" --out "$work/health.bin" health >/dev/null
"$body_tool" --out "$work/reserve.bin" reserve --subject bench-reserve --model gpt-4o \
  --prompt-tokens 100 --max-output-tokens 100 --hold-ms 1 >/dev/null
"$body_tool" --out "$work/dry.bin" reserve --subject bench-reserve --model gpt-4o \
  --prompt-tokens 100 --max-output-tokens 100 --hold-ms 1 --dry-run >/dev/null
"$body_tool" --out "$work/usage.bin" get-usage --subject bench-reserve >/dev/null
"$body_tool" --out "$work/prompt.bin" reserve --subject bench-prompt --model gpt-4o \
  --prompt-bytes 1024 --max-output-tokens 100 --hold-ms 1 >/dev/null

# name|path|body|kind (kind says how answers are checked)
health_path=grpc.health.v1.Health/Check
health_call="Health/Check|$health_path|health.bin|health"
calls=(
  "Reserve|tollgate.v1.Quota/Reserve|reserve.bin|reserve"
  "Reserve dry run|tollgate.v1.Quota/Reserve|dry.bin|dry"
  "GetUsage|tollgate.v1.Quota/GetUsage|usage.bin|usage"
  "Reserve, 1 KB prompt text|tollgate.v1.Quota/Reserve|prompt.bin|reserve"
)

# --- Server lifecycle.
addr=""
metrics_port=""

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Sends one request of BODY to PATH with curl and checks the answer as KIND says. Quiet: the
# status says whether it passed.
probe() {
  local path=$1 body=$2 kind=$3 hex
  curl -sS --max-time 5 --http2-prior-knowledge -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary "@$work/$body" -D "$work/probe.hdr" -o "$work/probe.bin" \
    "http://$addr/$path" 2>/dev/null || return 1
  grep -qiE '^grpc-status: 0[[:space:]]*$' "$work/probe.hdr" || return 1
  hex=$(od -An -tx1 -v "$work/probe.bin" | tr -d ' \n')
  case $kind in
    # SERVING: a 2-byte message, field 1 = 1.
    health) [ "$hex" = "00000000020801" ] ;;
    # A Reserve's field 1 (decision) comes first: 1 is DECISION_ALLOWED.
    reserve | dry) [ "${hex:10:4}" = "0801" ] ;;
    *) true ;;
  esac
}

# start_server DURABILITY LABEL: on PostgreSQL when LABEL starts with pg- (a fresh database).
start_server() {
  local durability=$1 label=$2 attempt server_log store_args=()
  # The metrics port is picked before the server binds it: retry if someone took it meanwhile.
  for attempt in 1 2 3; do
    metrics_port=$(free_port)
    rm -rf "$work/data"
    [[ $label == pg-* ]] && store_args=(--store "$(pg_fresh_db bench)")
    server_log=$out_dir/raw/server-$label
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" --policy "$work/policy.toml" \
      "${store_args[@]}" \
      --durability "$durability" --metrics-listen "127.0.0.1:$metrics_port" \
      >"$server_log.out" 2>"$server_log.err" &
    server_pid=$!
    addr=""
    for _ in $(seq 1 100); do
      addr=$(sed -n 's/^tollgate listening on \([0-9.:]*\).*/\1/p' "$server_log.out")
      [ -n "$addr" ] && break
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if [ -n "$addr" ]; then
      for _ in $(seq 1 100); do
        if probe "$health_path" health.bin health &&
          curl -sf --max-time 2 "http://127.0.0.1:$metrics_port/metrics" >/dev/null; then
          return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
    echo "server did not start (attempt $attempt):" >&2
    cat "$server_log.err" >&2
    stop_server
  done
  fail "could not start tollgate"
}

stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# --- Measuring.

# The server's counters as "key value" lines: rpc:METHOD:CODE and decision:DECISION.
scrape() {
  curl -sf --max-time 5 "http://127.0.0.1:$metrics_port/metrics" | awk '
    /^tollgate_rpc_duration_seconds_count\{/ {
      m = $0; sub(/.*method="/, "", m); sub(/".*/, "", m)
      c = $0; sub(/.*code="/, "", c); sub(/".*/, "", c)
      printf "rpc:%s:%s %.0f\n", m, c, $NF
    }
    /^tollgate_decisions_total\{/ {
      d = $0; sub(/.*decision="/, "", d); sub(/".*/, "", d)
      printf "decision:%s %.0f\n", d, $NF
    }' >"$1" || fail "could not read the server's metrics"
}

# How much the counters whose key matches REGEX grew from scrape BEFORE to scrape AFTER.
grew() {
  local before=$1 after=$2 regex=$3
  awk -v re="$regex" 'FNR == NR { if ($1 ~ re) b += $2; next } $1 ~ re { a += $2 }
    END { printf "%.0f\n", a - b }' "$before" "$after"
}

# The server's CPU time so far, in clock ticks (utime + stime of all its threads).
server_ticks() {
  sed 's/.*) //' "/proc/$server_pid/stat" | awk '{ print $12 + $13 }'
}

# Checks the server's answers to one run of KIND: from scrape BEFORE (ahead of the warm-up)
# to AFTER (once the measured run is over), no call ended with another code than OK and no
# Reserve was denied or downgraded; from MID (between warm-up and measured run) to AFTER, the
# server answered OK at least the SUCCEEDED requests h2load counted and at most the STARTED
# ones (requests still in flight when h2load stops are started, not done, and some of them
# still reach the server). Sets `answered` to the OK answers of the measured run (0 for
# Health, which the metrics do not count).
answered=0
check_answers() {
  local kind=$1 before=$2 mid=$3 after=$4 started=$5 succeeded=$6 label=$7 method ok all
  answered=0
  kill -0 "$server_pid" 2>/dev/null || fail "$label: the server exited (see $out_dir/raw/server-*.err)"
  [ "$(grew "$before" "$after" '^decision:(DENIED|DOWNGRADED)$')" = 0 ] ||
    fail "$label: Reserves were denied or downgraded (limits should be out of reach)"
  case $kind in
    health) return 0 ;;
    usage) method=GetUsage ;;
    *) method=Reserve ;;
  esac
  ok=$(grew "$before" "$after" "^rpc:$method:OK\$")
  all=$(grew "$before" "$after" "^rpc:$method:")
  ((all == ok)) || fail "$label: $((all - ok)) $method calls ended with another code than OK"
  # A Reserve is counted as decided before it is answered (in strict mode, before its sync),
  # so one cut off by h2load's stop may be counted as ALLOWED without an OK: fewer ALLOWED than
  # OK would mean answers that were not decisions (replays).
  if [ "$kind" = reserve ] && (($(grew "$before" "$after" '^decision:ALLOWED$') < ok)); then
    fail "$label: Reserves answered OK without being decided (replays?)"
  fi
  ok=$(grew "$mid" "$after" "^rpc:$method:OK\$")
  # The warm-up run's last requests (at most one per stream of its shape) may still be
  # answered after the scrape between the two runs: they count here too.
  local warm_tail=$((conns * streams))
  ((ok >= succeeded && ok <= started + warm_tail)) ||
    fail "$label: h2load started $started and saw $succeeded succeed, but the server answered $ok OK"
  answered=$ok
}

# p50, p99 and p99.9 (nearest rank) of the latencies in an h2load log, in microseconds.
percentiles() {
  cut -f3 "$1" | sort -n | awk '
    function rank(p,  r) { r = int(p * NR); if (r < p * NR) r++; return r < 1 ? 1 : r }
    { v[NR] = $1 }
    END { if (NR == 0) exit 1; print v[rank(0.5)], v[rank(0.99)], v[rank(0.999)] }'
}

# Runs h2load on one call at one shape (a warm-up run, then the measured run on new
# connections), checks its answers, and sets `run` to
# (req/s p50 p99 p99.9 server-CPU-us-per-call) ("-" for CPU where the server counts no calls).
# The warm-up is a run of its own rather than h2load's --warm-up-time: a request that straddles
# that boundary is logged with status 0, and counted as succeeded without a 2xx.
run=()
measure() {
  local call=$1 shape=$2 durability=$3 name path body kind conns streams label raw log
  local ticks0 ticks1 rps started succeeded bad cpu pcts
  IFS='|' read -r name path body kind <<<"$call"
  conns=${shape%x*}
  streams=${shape#*x}
  label="$name, $durability, $shape"
  raw="$out_dir/raw/$durability-$shape-${body%.bin}.txt"
  log=$work/h2load.log
  if ! probe "$path" "$body" "$kind"; then
    cp "$work/probe.hdr" "$raw.probe-headers" 2>/dev/null || true
    cp "$work/probe.bin" "$raw.probe-body" 2>/dev/null || true
    fail "$label: one request sent with curl was not answered OK (see $raw.probe-*)"
  fi
  scrape "$work/before"
  h2load_run "${warmup_ms}ms" "$conns" "$streams" "$body" "$path" /dev/null "$raw.warm-up" ||
    fail "$label: h2load's warm-up failed (see $raw.warm-up)"
  scrape "$work/mid"
  ticks0=$(server_ticks)
  rm -f "$log"
  h2load_run "$secs" "$conns" "$streams" "$body" "$path" "$log" "$raw" ||
    fail "$label: h2load failed (see $raw)"
  ticks1=$(server_ticks)
  scrape "$work/after"
  rps=$(awk '/^finished in/ { print $4 }' "$raw")
  read -r started succeeded bad <<<"$(awk '/^requests:/ { print $4, $8, $10 + $12 + $14 }' "$raw")"
  if [ -z "$rps" ] || [ -z "$succeeded" ]; then
    fail "$label: no result in h2load's output ($raw)"
  fi
  ((succeeded > 0 && bad == 0)) ||
    fail "$label: h2load: $succeeded succeeded, $bad failed, errored or timed out ($raw)"
  awk -F'\t' '$2 != 200' "$log" >"$raw.not-200"
  [ -s "$raw.not-200" ] && fail "$label: HTTP status other than 200 in h2load's log ($raw.not-200)"
  rm -f "$raw.not-200" "$raw.warm-up"
  check_answers "$kind" "$work/before" "$work/mid" "$work/after" "$started" "$succeeded" "$label"
  if ((answered > 0)); then
    cpu=$(awk -v t=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" -v n="$answered" \
      'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  else
    cpu="-"
  fi
  pcts=$(percentiles "$log")
  read -r -a run <<<"$rps $pcts $cpu"
  echo "  $label: $rps req/s (started $started, succeeded $succeeded; server answered $answered OK)" >&2
}

# One h2load run: DURATION CONNECTIONS STREAMS BODY PATH LOG OUTPUT. Bounded by -D, and by
# timeout in case the server stops answering.
h2load_run() {
  timeout $((secs + 60)) h2load -t1 -c"$2" -m"$3" -D "$1" -H 'content-type: application/grpc' \
    -H 'te: trailers' -d "$work/$4" --log-file "$6" "http://$addr/$5" >"$7" 2>&1
}

# Reserve+Commit pairs through examples/load.rs, beside Health/Check of the same shape.
measure_pairs() {
  local shape=$1 durability=$2 conns streams label raw health before after
  local calls_s denied errors reserve pair cpu_client cpu_server method
  conns=${shape%x*}
  streams=${shape#*x}
  label="Reserve+Commit, $durability, $shape"
  raw="$out_dir/raw/$durability-$shape-pairs.txt"
  measure "$health_call" "$shape" "$durability"
  health=("${run[@]}")
  scrape "$work/before"
  timeout $((secs + 60)) "$load_tool" --target "http://$addr" --connections "$conns" \
    --streams "$streams" --duration "$secs" --warmup "$(awk -v ms="$warmup_ms" 'BEGIN { print ms / 1000 }')" \
    --server-pid "$server_pid" >"$raw" 2>&1 || fail "$label: the load client failed (see $raw)"
  scrape "$work/after"
  read -r calls_s denied errors <<<"$(awk '/^calls\/s/ { print $5, $7, $9 }' "$raw")"
  read -r -a reserve <<<"$(awk '$1 == "Reserve" { print $4, $5, $6 }' "$raw")"
  read -r -a pair <<<"$(awk '$1 == "pair" { print $3, $4, $5, $6 }' "$raw")"
  read -r cpu_client cpu_server <<<"$(awk '/^cpu per call/ { print $5, $8 }' "$raw")"
  if [ -z "$calls_s" ] || [ ${#pair[@]} != 4 ]; then
    fail "$label: no result in the load client's output ($raw)"
  fi
  ((denied == 0 && errors == 0)) || fail "$label: $denied denied, $errors errors ($raw)"
  [ "$(grew "$work/before" "$work/after" '^decision:(DENIED|DOWNGRADED)$')" = 0 ] ||
    fail "$label: Reserves were denied or downgraded"
  for method in Reserve Commit; do
    (($(grew "$work/before" "$work/after" "^rpc:$method:") == $(grew "$work/before" "$work/after" "^rpc:$method:OK\$"))) ||
      fail "$label: $method calls ended with another code than OK"
  done
  # pairs.tsv: durability shape calls/s pairs/s pair-p50 reserve-p50 p99 p99.9 client-cpu
  # server-cpu health-req/s health-p50
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$durability" "$shape" "$calls_s" \
    "${pair[0]}" "${pair[1]}" "${reserve[0]}" "${reserve[1]}" "${reserve[2]}" "$cpu_client" \
    "$cpu_server" "${health[0]}" "${health[1]}" >>"$pairs"
  echo "  $label: $calls_s calls/s; CPU per call: client $cpu_client us, server $cpu_server us" >&2
}

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
started_at=$(date -u '+%Y-%m-%d %H:%M UTC')
[[ " $stores " == *" postgres "* ]] && pg_start
runs=()
for store in $stores; do
  for durability in strict relaxed; do
    if [ "$store" = postgres ]; then runs+=("pg-$durability"); else runs+=("$durability"); fi
  done
done
for label in "${runs[@]}"; do
  durability=${label#pg-}
  echo "== $label" >&2
  start_server "$durability" "$label"
  for shape in "${shapes[@]}"; do
    for call in "${calls[@]}"; do
      # On PostgreSQL only what writes: the plain Reserve.
      [[ $label == pg-* && ${call%%|*} != Reserve ]] && continue
      measure "$health_call" "$shape" "$label"
      health=("${run[@]}")
      measure "$call" "$shape" "$label"
      measured=("${run[@]}")
      # results.tsv: name durability shape req/s p50 p99 p99.9 server-cpu health-req/s
      # health-p50
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${call%%|*}" "$label" "$shape" \
        "${measured[@]}" "${health[0]}" "${health[1]}" >>"$results"
    done
  done
  for shape in "${pair_shapes[@]}"; do
    measure_pairs "$shape" "$label"
  done
  stop_server
done

# --- The report.
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || revision="$revision (with uncommitted changes)"
{
  echo "## Results of \`$command_line\`"
  echo
  echo "Machine: $(nproc) × $cpu_model, $(uname -sr), load average $load_at_start at the start."
  echo "Run: $started_at, tollgate $revision, $(h2load --version | head -n1), one h2load thread;"
  echo "each run ${secs} s measured, after a ${warmup_ms} ms warm-up run of the same call and shape."
  echo "Client and server share the cores."
  echo
  echo "Shape: connections × concurrent streams on each. Latencies in µs. Health/Check ran on the"
  echo "same server just before each row's call; ratio = req/s ÷ Health/Check's req/s. Server CPU"
  echo "is its user + system time over the measured run ÷ the calls it answered in it."
  echo
  echo "| call | store | durability | shape | req/s | p50 | p99 | p99.9 | server CPU µs/call | Health/Check req/s | Health/Check p50 | ratio |"
  echo "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ sub(/x/, "×", $3); store = sub(/^pg-/, "", $2) ? "PostgreSQL" : "sled"
    printf "| %s | %s | %s | %s | %.0f | %d | %d | %d | %s | %.0f | %d | %.2f |\n",
      $1, store, $2, $3, $4, $5, $6, $7, $8, $9, $10, $4 / $9 }' "$results"
  echo
  echo "Reserve+Commit pairs through \`examples/load.rs\` (a tonic client on the same cores; 64"
  echo "subjects; each call's own CPU time per call, client and server). calls/s counts Reserves and"
  echo "Commits; ratio = calls/s ÷ h2load's Health/Check req/s just before (different clients)."
  echo
  echo "| store | durability | shape | calls/s | pair p50 | Reserve p50 | Reserve p99 | Reserve p99.9 | client CPU µs/call | server CPU µs/call | Health/Check req/s | ratio |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ sub(/x/, "×", $2); store = sub(/^pg-/, "", $1) ? "PostgreSQL" : "sled"
    printf "| %s | %s | %s | %.0f | %d | %d | %d | %d | %s | %s | %.0f | %.2f |\n",
      store, $1, $2, $3, $5, $6, $7, $8, $9, $10, $11, $3 / $11 }' "$pairs"
  echo
  echo "Goals of issue 10 on sled at 8×32 (ratio to Health/Check) and 1×1 (p50 above Health/Check's):"
  echo
  awk -F'\t' '
    function goal(text, value, met) {
      printf "- %s: %s, %s\n", text, value, met ? "met" : "not met"
    }
    $3 == "8x32" {
      r = $4 / $9
      if ($1 == "Reserve" && $2 == "strict") goal("strict Reserve ≥ 0.60×", sprintf("%.3f×", r), r >= 0.6)
      if ($1 == "Reserve" && $2 == "relaxed") goal("relaxed Reserve ≥ 0.85×", sprintf("%.3f×", r), r >= 0.85)
      if ($1 == "Reserve dry run" || $1 == "GetUsage")
        goal(sprintf("%s, %s ≥ 0.85×", $1, $2), sprintf("%.3f×", r), r >= 0.85)
      if ($1 ~ /prompt/) goal(sprintf("%s, %s ≥ 0.30×", $1, $2), sprintf("%.3f×", r), r >= 0.3)
    }
    $3 == "1x1" && $1 == "Reserve" && $2 == "strict" {
      goal("strict Reserve p50 at 1×1 within 200 µs of Health/Check", sprintf("%+d µs", $5 - $10), $5 - $10 <= 200)
    }' "$results"
} >"$out_dir/results.md"
echo
cat "$out_dir/results.md"
echo
echo "Written to $out_dir/results.md (h2load's and the load client's own output in $out_dir/raw/)."
