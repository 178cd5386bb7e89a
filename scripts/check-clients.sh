#!/usr/bin/env bash
# Proves the example clients (examples/python, examples/node) against a live tollgate: each one's
# POST /chat is driven with curl and its answers, and tollgate's own figures (GetUsage, through
# the Python stubs), are checked. First in plaintext, in full; then against a tollgate serving
# TLS whose policy has [callers] (TOLLGATE_CA_FILE + TOLLGATE_TOKEN, and without the token:
# UNAUTHENTICATED), and one with --client-ca (TOLLGATE_CLIENT_CERT/_KEY, a caller known by the
# SAN of its certificate); the certificates are made here with openssl, for a throwaway CA.
# Installs what the examples need: a venv under target/ with examples/python/requirements.txt
# and the generated stubs, `npm ci` in examples/node, and Debian's openssl if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Starts NAME's command in the background and waits for "listening on" on its stdout.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 300); do
    grep -q "listening on" "$work/$name.out" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$work/$name.out" "$work/$name.err"
  echo "$name did not start"
  exit 1
}

# --- tollgate, on a free port (port 0: it prints the address it bound), with a small policy.
# TOLLGATE_BIN=path skips the build and runs that binary instead.
tollgate=${TOLLGATE_BIN:-}
if [ -z "$tollgate" ]; then
  cargo build --quiet --bin tollgate
  tollgate=./target/debug/tollgate
fi
cat >"$work/policy.toml" <<'EOF'
default_tier = "free"

[tiers.free]
models = ["gpt-4o-mini"]
tokens_per_day = 3000

[models."gpt-4o-mini"]
input_usd_per_million = 0.15
output_usd_per_million = 0.6

[models."gpt-4o"]
input_usd_per_million = 2.5
output_usd_per_million = 10.0
EOF
start tollgate "$tollgate" serve --listen 127.0.0.1:0 --data-dir "$work/data" --policy "$work/policy.toml"
tollgate_addr=$(sed -n 's/^tollgate listening on \([0-9.:]*\).*/\1/p' "$work/tollgate.out")
echo "tollgate on $tollgate_addr"

# --- the Python example: venv, pinned requirements, stubs generated from proto/.
venv=${CLIENTS_VENV:-target/examples-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
"$venv/bin/python" examples/python/generate_stubs.py
py="$(cd "$venv" && pwd)/bin/python"

# --- the Node example: exactly the versions in package-lock.json.
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
node --version

start python env TOLLGATE_ADDR="$tollgate_addr" PORT=0 "$py" examples/python/chat_server.py
start node env TOLLGATE_ADDR="$tollgate_addr" PORT=0 node examples/node/chat_server.js
python_url=$(grep -o 'http://[0-9.:]*' "$work/python.out")
node_url=$(grep -o 'http://[0-9.:]*' "$work/node.out")

fails=0
ok() { echo "ok: $1"; }
fail() {
  echo "FAILED: $1"
  fails=$((fails + 1))
}
check() { # check DESCRIPTION COMMAND...: ok if the command succeeds
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what (status $status, headers: $(tr -d '\r' <"$work/headers" | tr '\n' ' '), body: $(cat "$work/body"))"; fi
}

# post URL JSON: POSTs to URL/chat; sets $status, the body in $work/body, headers in $work/headers.
post() {
  status=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' --max-time 10 \
    -H 'Content-Type: application/json' --data "$2" "$1/chat")
}
# field NAME: a top-level field of the last answer's JSON body ("" when absent or null).
field() {
  python3 -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' \
    "$work/body" "$1"
}
# header NAME: a header of the last answer ("" when absent).
header() { tr -d '\r' <"$work/headers" | sed -n "s/^$1: *//Ip"; }
# usage SUBJECT [ADDR CA TOKEN CERT KEY]: tollgate's figures for SUBJECT, "used held requests
# open_holds", via GetUsage. At $tollgate_addr in plaintext, or at ADDR: over TLS trusting the
# CA file CA if given, with a caller's bearer TOKEN if given, with the client certificate CERT
# and its KEY if given (mTLS). An empty argument is one not given.
usage() {
  "$py" - "$1" "${2:-$tollgate_addr}" "${3:-}" "${4:-}" "${5:-}" "${6:-}" <<'PY'
import sys
sys.path.insert(0, "examples/python/generated")
import grpc
from tollgate.v1 import quota_pb2, quota_pb2_grpc

subject, addr, ca, token, cert, key = sys.argv[1:]
read = lambda path: open(path, "rb").read() if path else None
if ca:
    channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))
else:
    channel = grpc.insecure_channel(addr)
metadata = (("authorization", f"Bearer {token}"),) if token else None
with channel:
    u = quota_pb2_grpc.QuotaStub(channel).GetUsage(
        quota_pb2.GetUsageRequest(subject=subject), timeout=5, metadata=metadata
    )
print(u.used_tokens, u.held_tokens, u.requests, u.open_holds)
PY
}
is_uuid() { [[ $1 =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]]; }
positive() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

check_client() { # check_client LANGUAGE URL
  local lang=$1 url=$2 user="$1-user"
  echo "== $lang example at $url (user $user)"

  post "$url" "{\"user\": \"$user\", \"prompt\": \"Hello from $lang, how are you?\", \"max_output_tokens\": 100}"
  check "$lang: a first chat is 200" [ "$status" = 200 ]
  local id charged
  id=$(field reservation_id)
  charged=$(field charged_tokens)
  check "$lang: it names its reservation ($id)" is_uuid "$id"
  check "$lang: it was charged tokens ($charged)" positive "$charged"
  check "$lang: it was ALLOWED on gpt-4o-mini" [ "$(field decision) $(field model)" = "ALLOWED gpt-4o-mini" ]
  local used held requests holds
  read -r used held requests holds < <(usage "$user")
  check "$lang: tollgate's GetUsage shows the Commit (used $used = charged $charged, held $held, open holds $holds)" \
    [ "$used $held $holds" = "$charged 0 0" ]

  post "$url" "{\"user\": \"$user\", \"prompt\": \"This call will fail\", \"max_output_tokens\": 100, \"fail\": true}"
  check "$lang: a failing LLM call answers 502" [ "$status" = 502 ]
  local used2 held2 requests2 holds2
  read -r used2 held2 requests2 holds2 < <(usage "$user")
  check "$lang: the failed call's hold was Refunded (held $held2, open holds $holds2, used $used2 = $used)" \
    [ "$used2 $held2 $holds2" = "$used 0 0" ]
  check "$lang: ... and its Reserve was admitted (requests $requests -> $requests2)" [ "$requests2" = $((requests + 1)) ]

  post "$url" "{\"user\": \"$user\", \"prompt\": \"Explain quantum physics\", \"model\": \"gpt-4o\", \"max_output_tokens\": 100}"
  check "$lang: a model outside the tier's list is 429" [ "$status" = 429 ]
  check "$lang: ... denied_by model" [ "$(field denied_by)" = model ]
  check "$lang: ... with no Retry-After (no wait helps)" [ -z "$(header Retry-After)" ]

  post "$url" "{\"user\": \"$user\", \"prompt\": \"Hi\", \"model\": \"no-such-model\"}"
  check "$lang: a model tollgate cannot count (INVALID_ARGUMENT) is 400" [ "$status" = 400 ]

  # ~300 prompt tokens + 600 completion a chat: the 3000-token day runs out after a few.
  local long="{\"user\": \"$user\", \"prompt\": \"$(printf 'word %.0s' $(seq 1 300))\", \"max_output_tokens\": 600}"
  local allowed=0
  for _ in $(seq 1 10); do
    post "$url" "$long"
    [ "$status" = 200 ] || break
    allowed=$((allowed + 1))
  done
  check "$lang: repeated chats are allowed at first ($allowed of them)" [ "$allowed" -ge 1 ]
  check "$lang: ... and then 429" [ "$status" = 429 ]
  check "$lang: ... denied_by tokens_per_day" [ "$(field denied_by)" = tokens_per_day ]
  check "$lang: ... with Retry-After > 0 ($(header Retry-After) s)" positive "$(header Retry-After)"
}

check_client python "$python_url"
check_client node "$node_url"

# --- TLS. A throwaway CA signs a server certificate for localhost and 127.0.0.1, and a client
# certificate whose SAN (chat-app.internal) names a caller of the policy.
# shellcheck source=scripts/lib/certs.sh
source scripts/lib/certs.sh
tls="$work/tls"
{
  certs_ca "$tls" &&
    certs_leaf "$tls" server 'DNS:localhost, IP:127.0.0.1' serverAuth &&
    certs_leaf "$tls" client 'DNS:chat-app.internal' clientAuth
} 2>"$work/openssl.log" || { cat "$work/openssl.log"; echo "openssl could not make the certificates"; exit 1; }

# The same policy, with two callers: one known by its bearer token (the policy holds only the
# token's SHA-256, from `tollgate hash-token`), one by its client certificate's SAN.
token=$(openssl rand -hex 32)
token_sha256=$(printf '%s\n' "$token" | "$tollgate" hash-token)
cp "$work/policy.toml" "$work/policy-callers.toml"
cat >>"$work/policy-callers.toml" <<EOF

[callers.chat-app]
token_sha256 = "$token_sha256"

[callers.chat-app-mtls]
san = "chat-app.internal"
EOF
start tollgate-tls "$tollgate" serve --listen 127.0.0.1:0 --data-dir "$work/data-tls" \
  --policy "$work/policy-callers.toml" --tls-cert "$tls/server.pem" --tls-key "$tls/server.key"
start tollgate-mtls "$tollgate" serve --listen 127.0.0.1:0 --data-dir "$work/data-mtls" \
  --policy "$work/policy-callers.toml" --tls-cert "$tls/server.pem" --tls-key "$tls/server.key" \
  --client-ca "$tls/ca.pem"
# Dialled by name: localhost is what the server certificate says (beside 127.0.0.1).
tls_addr=localhost:$(sed -n 's/^tollgate listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/tollgate-tls.out")
mtls_addr=localhost:$(sed -n 's/^tollgate listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/tollgate-mtls.out")
echo "tollgate with TLS and [callers] on $tls_addr, with mTLS too on $mtls_addr"
# How GetUsage reaches each: usage SUBJECT "${via_tls[@]}".
via_tls=("$tls_addr" "$tls/ca.pem" "$token")
via_mtls=("$mtls_addr" "$tls/ca.pem" "" "$tls/client.pem" "$tls/client.key")

declare -A urls
for lang in python node; do
  if [ $lang = python ]; then cmd=("$py" examples/python/chat_server.py); else cmd=(node examples/node/chat_server.js); fi
  start "$lang-tls" env TOLLGATE_ADDR="$tls_addr" TOLLGATE_CA_FILE="$tls/ca.pem" TOLLGATE_TOKEN="$token" \
    PORT=0 "${cmd[@]}"
  start "$lang-tls-no-token" env TOLLGATE_ADDR="$tls_addr" TOLLGATE_CA_FILE="$tls/ca.pem" PORT=0 "${cmd[@]}"
  start "$lang-mtls" env TOLLGATE_ADDR="$mtls_addr" TOLLGATE_CA_FILE="$tls/ca.pem" \
    TOLLGATE_CLIENT_CERT="$tls/client.pem" TOLLGATE_CLIENT_KEY="$tls/client.key" PORT=0 "${cmd[@]}"
  for variant in tls tls-no-token mtls; do
    urls[$lang-$variant]=$(grep -o 'http://[0-9.:]*' "$work/$lang-$variant.out")
  done
done

# check_secure LANGUAGE VARIANT: through the example started with VARIANT's variables (tls:
# TOLLGATE_CA_FILE and TOLLGATE_TOKEN; mtls: TOLLGATE_CA_FILE and a client certificate), a chat
# is 200 and Committed, and a failing one is 502 and Refunded, in tollgate's own figures.
check_secure() {
  local lang=$1 variant=$2 url=${urls[$1-$2]} user="$1-$2-user"
  local -a via
  if [ "$variant" = tls ]; then via=("${via_tls[@]}"); else via=("${via_mtls[@]}"); fi
  echo "== $lang example over $variant at $url (user $user)"
  post "$url" "{\"user\": \"$user\", \"prompt\": \"Hello over $variant\", \"max_output_tokens\": 100}"
  check "$lang/$variant: a first chat is 200" [ "$status" = 200 ]
  local id charged
  id=$(field reservation_id)
  charged=$(field charged_tokens)
  check "$lang/$variant: it names its reservation ($id)" is_uuid "$id"
  check "$lang/$variant: it was charged tokens ($charged)" positive "$charged"
  check "$lang/$variant: it was ALLOWED" [ "$(field decision)" = ALLOWED ]
  local used held requests holds
  read -r used held requests holds < <(usage "$user" "${via[@]}")
  check "$lang/$variant: GetUsage over $variant shows the Commit (used $used = charged $charged, held $held, open holds $holds)" \
    [ "$used $held $holds" = "$charged 0 0" ]
  post "$url" "{\"user\": \"$user\", \"prompt\": \"This call will fail\", \"max_output_tokens\": 100, \"fail\": true}"
  check "$lang/$variant: a failing LLM call answers 502" [ "$status" = 502 ]
  read -r used held requests holds < <(usage "$user" "${via[@]}")
  check "$lang/$variant: ... and its hold was Refunded (held $held, open holds $holds, requests $requests)" \
    [ "$held $holds $requests" = "0 0 2" ]
}

# check_no_token LANGUAGE: without TOLLGATE_TOKEN, tollgate (whose policy has [callers]) answers
# UNAUTHENTICATED; the example fails closed with 503 and logs tollgate's reason.
check_no_token() {
  local lang=$1 url=${urls[$1-tls-no-token]} user="$1-no-token-user"
  echo "== $lang example over TLS without TOLLGATE_TOKEN at $url (user $user)"
  post "$url" "{\"user\": \"$user\", \"prompt\": \"Hello\", \"max_output_tokens\": 100}"
  check "$lang/no token: the chat is 503, UNAUTHENTICATED" \
    [ "$status $(field error)" = "503 quota service unavailable: UNAUTHENTICATED" ]
  check "$lang/no token: its log gives tollgate's reason: $(grep -m1 'reserve failed' "$work/$lang-tls-no-token.err" | cut -c1-90)..." \
    grep -q 'reserve failed: UNAUTHENTICATED: no credentials' "$work/$lang-tls-no-token.err"
  local used held requests holds
  read -r used held requests holds < <(usage "$user" "${via_tls[@]}")
  check "$lang/no token: tollgate admitted nothing for it (requests $requests, used $used, held $held)" \
    [ "$requests $used $held" = "0 0 0" ]
}

for lang in python node; do
  check_secure "$lang" tls
  check_no_token "$lang"
  check_secure "$lang" mtls
done

if [ "$fails" -ne 0 ]; then
  for name in tollgate python node tollgate-tls tollgate-mtls {python,node}-{tls,tls-no-token,mtls}; do
    echo "--- $name stderr (last lines)"
    tail -n 20 "$work/$name.err"
  done
  echo "$fails client checks failed"
  exit 1
fi
echo "example clients: all checks passed in $((SECONDS - started)) s"
