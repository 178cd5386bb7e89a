"""A tiny HTTP chat endpoint that asks tollgate before every (simulated) LLM call.

    POST /chat  {"user": "alice", "prompt": "Hello!", "model"?: "gpt-4o-mini",
                 "max_output_tokens"?: 200, "fail"?: false}

The flow is the one every tollgate client follows:

1. Reserve: "may this user spend about prompt + max_output tokens on this model now?"
   DENIED -> HTTP 429 with Retry-After. ALLOWED or DOWNGRADED -> the tokens are held.
2. Call the LLM with the model tollgate *granted* (simulated here).
3. Commit the usage the provider reported (the unused rest of the hold flows back), or Refund
   the hold if the call never happened (HTTP 502).

Setup:  pip install -r requirements.txt && python generate_stubs.py
Run:    TOLLGATE_ADDR=127.0.0.1:50051 PORT=8080 python chat_server.py
TLS:    TOLLGATE_ADDR=localhost:50051 TOLLGATE_CA_FILE=ca.pem python chat_server.py
        (TOLLGATE_TOKEN: a [callers] bearer token; TOLLGATE_CLIENT_CERT/_KEY: mTLS)
"""

import json
import math
import os
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

# The stubs are generated into ./generated (see generate_stubs.py), not installed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated"))
from tollgate.v1 import quota_pb2, quota_pb2_grpc  # noqa: E402

TOLLGATE_ADDR = os.environ.get("TOLLGATE_ADDR", "127.0.0.1:50051")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8080"))
DEFAULT_MODEL = "gpt-4o-mini"
# Tollgate refuses prompts over 4 MiB by default; a body much larger is refused here first.
MAX_BODY_BYTES = 5 * 1024 * 1024

# Every call gets a deadline. Tollgate answers in about a millisecond (a Commit waits for its
# fsync); if it does not answer in 2 s something is wrong, and a chat request should not hang.
RPC_TIMEOUT_S = 2.0

# gRPC retries a call that failed with UNAVAILABLE (e.g. a connection reset) by itself, within
# the call's deadline. That is safe for all of tollgate's calls: Reserve carries an
# idempotency_key (a retry returns the first answer and holds nothing more), and a repeated
# Commit or Refund with the same content returns the same result.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "tollgate.v1.Quota"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

# How this app reaches tollgate and proves who it is (see examples/README.md):
# TOLLGATE_CA_FILE    TLS: the PEM of the CA that signed tollgate's certificate (tollgate serve
#                     --tls-cert/--tls-key). Unset: plaintext, as with a plain `tollgate serve`.
# TOLLGATE_CLIENT_CERT, TOLLGATE_CLIENT_KEY
#                     mTLS (tollgate serve --client-ca): this app's certificate chain and its key.
#                     Tollgate knows the app by a SAN of it when the policy's [callers] entry has
#                     `san = ...`.
# TOLLGATE_TOKEN      the bearer token of this app's [callers] entry (the policy holds only its
#                     SHA-256: `tollgate hash-token`), sent as `authorization: Bearer <token>`.
TOLLGATE_CA_FILE = os.environ.get("TOLLGATE_CA_FILE") or None
TOLLGATE_CLIENT_CERT = os.environ.get("TOLLGATE_CLIENT_CERT") or None
TOLLGATE_CLIENT_KEY = os.environ.get("TOLLGATE_CLIENT_KEY") or None
TOLLGATE_TOKEN = os.environ.get("TOLLGATE_TOKEN") or None


def read_file(variable, path):
    """The bytes of the file named by an environment variable; exits, naming both, if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        sys.exit(f"{variable}={path}: {err.strerror}")


def channel_credentials():
    """TLS credentials from the TOLLGATE_* variables; None for plaintext."""
    if (TOLLGATE_CLIENT_CERT is None) != (TOLLGATE_CLIENT_KEY is None):
        sys.exit("TOLLGATE_CLIENT_CERT and TOLLGATE_CLIENT_KEY go together (mTLS needs both)")
    if TOLLGATE_CA_FILE is None:
        if TOLLGATE_CLIENT_CERT is not None:
            sys.exit("TOLLGATE_CLIENT_CERT needs TOLLGATE_CA_FILE (mTLS is TLS)")
        return None
    # Read once, at start: a rotated client certificate takes a restart of this app.
    key = chain = None
    if TOLLGATE_CLIENT_CERT is not None:
        chain = read_file("TOLLGATE_CLIENT_CERT", TOLLGATE_CLIENT_CERT)
        key = read_file("TOLLGATE_CLIENT_KEY", TOLLGATE_CLIENT_KEY)
    return grpc.ssl_channel_credentials(
        root_certificates=read_file("TOLLGATE_CA_FILE", TOLLGATE_CA_FILE),
        private_key=key,
        certificate_chain=chain,
    )


# The token goes with every call, as metadata. (grpc.access_token_call_credentials would do
# the same, but only on a TLS channel; metadata also works behind a mesh that does the TLS.)
CALL_METADATA = (("authorization", f"Bearer {TOLLGATE_TOKEN}"),) if TOLLGATE_TOKEN else None

# One channel for the whole process: it is thread-safe and keeps one HTTP/2 connection open,
# so each chat costs a round trip, not a TCP (and TLS) handshake.
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG)]
credentials = channel_credentials()
if credentials is None:
    if TOLLGATE_TOKEN:
        print(
            "warning: TOLLGATE_TOKEN without TOLLGATE_CA_FILE: the token crosses the network"
            " in clear text",
            file=sys.stderr,
        )
    channel = grpc.insecure_channel(TOLLGATE_ADDR, options=CHANNEL_OPTIONS)
else:
    # The name checked against tollgate's certificate is TOLLGATE_ADDR's host: use the name
    # (or IP address) the certificate carries, e.g. localhost:50051 for a local trial.
    channel = grpc.secure_channel(TOLLGATE_ADDR, credentials, options=CHANNEL_OPTIONS)
quota = quota_pb2_grpc.QuotaStub(channel)


class ProviderError(Exception):
    """What a real LLM client raises when the provider call fails."""


def simulated_llm_call(model, prompt, max_output_tokens, fail):
    """Stands in for the provider call. Deterministic, so tests can rely on it.

    Returns (reply text, completion tokens). The completion never exceeds max_output_tokens,
    just as a provider never returns more than max_tokens.
    """
    if fail:
        raise ProviderError("simulated provider failure")
    completion_tokens = min(max_output_tokens, 10 + 2 * len(prompt.split()))
    reply = (
        f"[{model}] You said {len(prompt.split())} words; here are {completion_tokens} tokens back."
    )
    return reply, completion_tokens


def retry_after_seconds(reserve):
    """Retry-After in whole seconds, rounded up; None when tollgate says no wait can help."""
    if not reserve.HasField("retry_after"):
        return None
    return math.ceil(reserve.retry_after.seconds + reserve.retry_after.nanos / 1e9)


def chat(body, client_ip):
    """Handles one chat request. Returns (HTTP status, JSON body, extra headers)."""
    user, prompt = body.get("user"), body.get("prompt")
    if not isinstance(user, str) or not isinstance(prompt, str):
        return 400, {"error": "user and prompt must be strings"}, {}
    model = body.get("model") or DEFAULT_MODEL
    if not isinstance(model, str):
        return 400, {"error": "model must be a string"}, {}
    max_output = body.get("max_output_tokens")
    if max_output is not None and (type(max_output) is not int or max_output < 0):
        return 400, {"error": "max_output_tokens must be a non-negative integer"}, {}

    request = quota_pb2.ReserveRequest(
        subject=user,
        model=model,
        # The prompt goes as text: tollgate counts it with the model's own tokenizer, so this
        # app needs no tokenizer, and the count matches what the provider will bill.
        prompt=prompt,
        # A fresh key per HTTP request: gRPC's automatic retries of this Reserve (above) then
        # return the first answer instead of holding the tokens twice.
        idempotency_key=str(uuid.uuid4()),
        # The end user's address, so per-IP limits ([ip] in the policy) apply too. Behind a
        # reverse proxy this would come from X-Forwarded-For (from a proxy you trust).
        client_ip=client_ip,
    )
    if max_output is not None:
        # Optional in the proto: left out, tollgate holds the model's default output ceiling.
        request.max_output_tokens = max_output

    try:
        reserve = quota.Reserve(request, timeout=RPC_TIMEOUT_S, metadata=CALL_METADATA)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            # A bad request (e.g. an unknown model): tollgate's message names the field and rule.
            return 400, {"error": err.details()}, {}
        # Tollgate unreachable or failing, or refusing this app (UNAUTHENTICATED: a missing or
        # unknown token or client certificate; PERMISSION_DENIED: a call or subject its
        # [callers] entry does not allow): this example fails closed (no budget check, no
        # call). An app that prefers availability over the budget could call the LLM anyway.
        # The details (tollgate's message says what is missing) go to the log, not the user.
        print(f"reserve failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 503, {"error": f"quota service unavailable: {err.code().name}"}, {}

    if reserve.decision == quota_pb2.DECISION_DENIED:
        # A denial is an answer, not an error: denied_by names the limit that said no.
        wait = retry_after_seconds(reserve)
        headers = {} if wait is None else {"Retry-After": str(wait)}
        return (
            429,
            {
                "error": "quota exceeded",
                "denied_by": reserve.denied_by,
                "retry_after_seconds": wait,
            },
            headers,
        )

    # ALLOWED or DOWNGRADED: call the model tollgate granted, which on a downgrade is a cheaper
    # one than asked for. The output hold is what was reserved beyond the prompt (when the
    # request left max_output_tokens out, that is tollgate's default ceiling).
    granted = reserve.model
    output_hold = reserve.reserved_tokens - reserve.prompt_tokens
    try:
        reply, completion_tokens = simulated_llm_call(
            granted, prompt, output_hold, body.get("fail") is True
        )
    except ProviderError as err:
        # The call never happened: give the whole hold back rather than let it expire (an
        # expired hold is charged in full, on the assumption the call was made).
        try:
            quota.Refund(
                quota_pb2.RefundRequest(reservation_id=reserve.reservation_id),
                timeout=RPC_TIMEOUT_S,
                metadata=CALL_METADATA,
            )
        except grpc.RpcError as refund_err:
            print(
                f"refund of {reserve.reservation_id} failed: {refund_err.code().name}",
                file=sys.stderr,
            )
        return (
            502,
            {"error": f"LLM call failed: {err}", "reservation_id": reserve.reservation_id},
            {},
        )

    # Charge what the provider reported. prompt_tokens is tollgate's own count for the granted
    # model; with a real provider, use the usage figures from its response instead.
    try:
        commit = quota.Commit(
            quota_pb2.CommitRequest(
                reservation_id=reserve.reservation_id,
                prompt_tokens=reserve.prompt_tokens,
                completion_tokens=completion_tokens,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=CALL_METADATA,
        )
        charged = commit.charged_tokens
    except grpc.RpcError as err:
        # The user already has the reply, so don't fail the request. The hold stays open and
        # is charged in full when it expires; a Commit within 24 h of that still reconciles.
        print(f"commit of {reserve.reservation_id} failed: {err.code().name}", file=sys.stderr)
        charged = None

    return (
        200,
        {
            "reply": reply,
            "model": granted,
            "reservation_id": reserve.reservation_id,
            "charged_tokens": charged,
            "decision": quota_pb2.Decision.Name(reserve.decision).removeprefix("DECISION_"),
        },
        {},
    )


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/chat":
            return self.respond(404, {"error": "not found"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            return self.respond(400, {"error": "bad Content-Length"})
        if length > MAX_BODY_BYTES:
            return self.respond(413, {"error": "body too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.respond(400, {"error": "body must be JSON"})
        if not isinstance(body, dict):
            return self.respond(400, {"error": "body must be a JSON object"})
        try:
            status, payload, headers = chat(body, client_ip=self.client_address[0])
        except Exception as err:  # a bug or an input nobody thought of: answer, don't hang up
            self.log_error("chat failed: %r", err)
            status, payload, headers = 500, {"error": "internal error"}, {}
        self.respond(status, payload, headers)

    def respond(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    # scripts/check-clients.sh waits for "listening on" and reads the URL from this line.
    security = "plaintext" if credentials is None else "TLS"
    if TOLLGATE_CLIENT_CERT:
        security += ", client certificate"
    if TOLLGATE_TOKEN:
        security += ", bearer token"
    print(
        f"chat example listening on http://{HOST}:{server.server_address[1]}"
        f" (tollgate at {TOLLGATE_ADDR}, {security})",
        flush=True,
    )
    server.serve_forever()
