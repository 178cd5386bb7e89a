#!/usr/bin/env bash
# Replicas on PostgreSQL, timed: restart to SERVING with a million subjects on each store, and
# failover time (kill -9 of the leader until a Reserve through another replica is ALLOWED).
#
#   scripts/bench-replicas.sh                            # about 6 minutes
#   BENCH_SUBJECTS=100000 BENCH_KILLS=1 scripts/bench-replicas.sh   # quick, to check the script
#
# How, and why so:
# - A PostgreSQL server of its own (scripts/lib/postgres.sh), defaults for durability.
# - Restart: examples/footprint.rs writes N subjects with usage and N settled reservations
#   (with idempotency keys) through the real ledger into a sled directory, times the real
#   server on it to health SERVING, then moves the same ledger into PostgreSQL (export, import)
#   and times the server on that.
# - Failover: three replicas of the real binary on one database (the default --lease-ttl, 5 s),
#   every one ready (Quota SERVING). The leader (the lease row's address) is killed with
#   SIGKILL; from that instant both survivors are asked, in turn, for a Reserve every 10 ms,
#   until one answers OK and ALLOWED. The killed one is then started again (it follows), and
#   the next round kills whoever leads. Rounds on an empty ledger, then on the million.
#
# Prints a Markdown summary, also written to target/bench/replicas.md.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

subjects=${BENCH_SUBJECTS:-1000000}
kills=${BENCH_KILLS:-3}
target_dir=${CARGO_TARGET_DIR:-target}
out_dir=$target_dir/bench
mkdir -p "$out_dir/raw"

fail() {
  echo "bench-replicas: FAILED: $*" >&2
  exit 1
}
for tool in curl python3 timeout od; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done
# shellcheck source=scripts/lib/postgres.sh
source scripts/lib/postgres.sh

cargo build --release --bin tollgate --example footprint --example grpc_body
bin=$target_dir/release/tollgate
footprint=$target_dir/release/examples/footprint
body_tool=$target_dir/release/examples/grpc_body

work=$(mktemp -d)
declare -A pid_of=() # address -> pid
cleanup() {
  for pid in "${pid_of[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  pg_stop "$out_dir/raw/replicas-postgres.log"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$work/policy.toml" <<'EOF'
default_tier = "bench"

[tiers.bench]
tokens_per_day = 1000000000000000
EOF
"$body_tool" --out "$work/reserve.bin" reserve --subject failover-probe --model gpt-4o \
  --prompt-tokens 10 --max-output-tokens 10 --hold-ms 1 >/dev/null
"$body_tool" --out "$work/ready.bin" health --service tollgate.v1.Quota >/dev/null

# ask ADDR PATH BODY: whether ADDR answers grpc-status 0 with the first field 1 (a Reserve's
# decision ALLOWED; a health check's SERVING).
ask() {
  local hex
  curl -sS --max-time 1 --http2-prior-knowledge -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary "@$work/$3" -D "$work/ask.hdr" -o "$work/ask.bin" \
    "http://$1/$2" 2>/dev/null || return 1
  grep -qiE '^grpc-status: 0[[:space:]]*$' "$work/ask.hdr" || return 1
  hex=$(od -An -tx1 -v "$work/ask.bin" | tr -d ' \n')
  [ "${hex:10:4}" = "0801" ]
}

now() { date +%s.%N; }

# start_replica URL LOG: starts one, waits for its address; sets `started` to it.
started=""
start_replica() {
  local log=$2 pid
  "$bin" serve --listen 127.0.0.1:0 --store "$1" --policy "$work/policy.toml" \
    >"$log.out" 2>"$log.err" &
  pid=$!
  disown "$pid" # killed on purpose: no job notices
  started=""
  for _ in $(seq 1 600); do
    started=$(sed -n 's/^tollgate listening on \([0-9.:]*\).*/\1/p' "$log.out")
    [ -n "$started" ] && break
    kill -0 "$pid" 2>/dev/null || fail "a replica stopped at start (see $log.err)"
    sleep 0.1
  done
  [ -n "$started" ] || fail "a replica did not start (see $log.err)"
  pid_of[$started]=$pid
}

ready() {
  for _ in $(seq 1 1200); do
    ask "$1" grpc.health.v1.Health/Check ready.bin && return 0
    sleep 0.1
  done
  fail "replica $1 not ready in 120 s"
}

# failover URL NAME: KILLS rounds on the database at URL; appends "NAME<TAB>seconds" lines.
failover() {
  local url=$1 name=$2 round leader t0 t1 addr others=()
  pid_of=()
  start_replica "$url" "$out_dir/raw/replica-$name-0"
  ready "$started"
  start_replica "$url" "$out_dir/raw/replica-$name-1"
  start_replica "$url" "$out_dir/raw/replica-$name-2"
  for addr in "${!pid_of[@]}"; do ready "$addr"; done
  for round in $(seq 1 "$kills"); do
    # Every replica ready, and one leading: kill that one.
    leader=$(pg_sql "SELECT address FROM tollgate_lease WHERE expires_at > now()" "${url##*/}")
    [ -n "${pid_of[$leader]:-}" ] || fail "the lease names $leader, not a replica started here"
    others=()
    for addr in "${!pid_of[@]}"; do [ "$addr" != "$leader" ] && others+=("$addr"); done
    t0=$(now)
    kill -9 "${pid_of[$leader]}"
    unset "pid_of[$leader]"
    t1=""
    while [ -z "$t1" ]; do
      for addr in "${others[@]}"; do
        if ask "$addr" tollgate.v1.Quota/Reserve reserve.bin; then
          t1=$(now)
          break
        fi
        sleep 0.01
      done
      awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 120) }' && fail "$name: no answer 120 s after the kill"
    done
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s\t%.2f\n", n, b - a }' >>"$work/failover.tsv"
    echo "  $name, round $round: a Reserve ALLOWED $(tail -n1 "$work/failover.tsv" | cut -f2) s after kill -9 of the leader" >&2
    # The killed one comes back (it follows the new leader), and every replica is ready again.
    start_replica "$url" "$out_dir/raw/replica-$name-back-$round"
    for addr in "${!pid_of[@]}"; do ready "$addr"; done
  done
  for addr in "${!pid_of[@]}"; do
    kill -9 "${pid_of[$addr]}" 2>/dev/null || true
  done
  pid_of=()
}

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
started_at=$(date -u '+%Y-%m-%d %H:%M UTC')
pg_start
: >"$work/failover.tsv"
empty_url=$(pg_fresh_db empty)
million_url=$(pg_fresh_db million)

echo "== restart with $subjects subjects on each store" >&2
"$footprint" --restart-only --subjects "$subjects" --data-dir "$work/m1" --serve "$bin" \
  --store "$million_url" | tee "$out_dir/raw/replicas-restart.txt" >&2

echo "== failover, empty ledger" >&2
failover "$empty_url" empty
echo "== failover, $subjects subjects" >&2
failover "$million_url" million

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || revision="$revision (with uncommitted changes)"
{
  echo "## Results of \`scripts/bench-replicas.sh\` ($subjects subjects, $kills kills per ledger)"
  echo
  echo "Machine: $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), load average $load_at_start at the start."
  echo "Run: $started_at, tollgate $revision, $("$pg_bin/postgres" --version)."
  echo
  echo "Restart to health SERVING (Quota), the same ledger on each store:"
  echo
  grep -E '^(wrote|restart|serve on|moved)' "$out_dir/raw/replicas-restart.txt" | sed 's/^/- /'
  echo
  echo "Failover: kill -9 of the leader until a Reserve through another replica is ALLOWED"
  echo "(--lease-ttl 5 s, the default), in seconds:"
  echo
  echo "| ledger | each round | median |"
  echo "|---|---|---:|"
  for name in empty million; do
    values=$(awk -F'\t' -v n="$name" '$1 == n { print $2 }' "$work/failover.tsv")
    [ -n "$values" ] || continue
    label=$([ "$name" = empty ] && echo "empty" || echo "$subjects subjects")
    median=$(sort -n <<<"$values" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
    echo "| $label | $(paste -sd, <<<"$values" | sed 's/,/, /g') | $median |"
  done
} >"$out_dir/replicas.md"
echo
cat "$out_dir/replicas.md"
