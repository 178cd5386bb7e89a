// A tiny HTTP chat endpoint that asks tollgate before every (simulated) LLM call.
//
//   POST /chat  {"user": "alice", "prompt": "Hello!", "model"?: "gpt-4o-mini",
//                "max_output_tokens"?: 200, "fail"?: false}
//
// The flow is the one every tollgate client follows:
//
// 1. Reserve: "may this user spend about prompt + max_output tokens on this model now?"
//    DENIED -> HTTP 429 with Retry-After. ALLOWED or DOWNGRADED -> the tokens are held.
// 2. Call the LLM with the model tollgate *granted* (simulated here).
// 3. Commit the usage the provider reported (the unused rest of the hold flows back), or Refund
//    the hold if the call never happened (HTTP 502).
//
// Setup:  npm ci
// Run:    TOLLGATE_ADDR=127.0.0.1:50051 PORT=8080 node chat_server.js
// TLS:    TOLLGATE_ADDR=localhost:50051 TOLLGATE_CA_FILE=ca.pem node chat_server.js
//         (TOLLGATE_TOKEN: a [callers] bearer token; TOLLGATE_CLIENT_CERT/_KEY: mTLS)
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const TOLLGATE_ADDR = process.env.TOLLGATE_ADDR || '127.0.0.1:50051';
const HOST = process.env.HOST || '127.0.0.1';
const PORT = Number(process.env.PORT || 8080);
const DEFAULT_MODEL = 'gpt-4o-mini';
// Tollgate refuses prompts over 4 MiB by default; a body much larger is refused here first.
const MAX_BODY_BYTES = 5 * 1024 * 1024;

// Every call gets a deadline. Tollgate answers in about a millisecond (a Commit waits for its
// fsync); if it does not answer in 2 s something is wrong, and a chat request should not hang.
const RPC_TIMEOUT_MS = 2000;

// The proto is loaded at run time: no generated code to keep in step with it.
const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync(path.join(PROTO_ROOT, 'tollgate', 'v1', 'quota.proto'), {
  // The imports google/protobuf/duration.proto and timestamp.proto are the well-known types,
  // which proto-loader (protobufjs) ships: only our own proto root needs naming.
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the proto: reservation_id, not reservationId
  longs: Number, // uint64 token counts as plain numbers (they stay far below 2^53)
  enums: String, // decision as 'DECISION_DENIED', not 2
  defaults: true, // fields at their default value are present (0, ''), not undefined
  oneofs: true,
});
const tollgate = grpc.loadPackageDefinition(definition).tollgate.v1;

// gRPC retries a call that failed with UNAVAILABLE (e.g. a connection reset) by itself, within
// the call's deadline. That is safe for all of tollgate's calls: Reserve carries an
// idempotency_key (a retry returns the first answer and holds nothing more), and a repeated
// Commit or Refund with the same content returns the same result.
const serviceConfig = {
  methodConfig: [
    {
      name: [{ service: 'tollgate.v1.Quota' }],
      retryPolicy: {
        maxAttempts: 3,
        initialBackoff: '0.05s',
        maxBackoff: '0.5s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
};

// How this app reaches tollgate and proves who it is (see examples/README.md):
// TOLLGATE_CA_FILE    TLS: the PEM of the CA that signed tollgate's certificate (tollgate serve
//                     --tls-cert/--tls-key). Unset: plaintext, as with a plain `tollgate serve`.
// TOLLGATE_CLIENT_CERT, TOLLGATE_CLIENT_KEY
//                     mTLS (tollgate serve --client-ca): this app's certificate chain and its key.
//                     Tollgate knows the app by a SAN of it when the policy's [callers] entry has
//                     `san = ...`.
// TOLLGATE_TOKEN      the bearer token of this app's [callers] entry (the policy holds only its
//                     SHA-256: `tollgate hash-token`), sent as `authorization: Bearer <token>`.
const TOLLGATE_CA_FILE = process.env.TOLLGATE_CA_FILE || null;
const TOLLGATE_CLIENT_CERT = process.env.TOLLGATE_CLIENT_CERT || null;
const TOLLGATE_CLIENT_KEY = process.env.TOLLGATE_CLIENT_KEY || null;
const TOLLGATE_TOKEN = process.env.TOLLGATE_TOKEN || null;

function exit(message) {
  console.error(message);
  process.exit(1);
}

// The bytes of the file named by an environment variable; exits, naming both, if unreadable.
function readFile(variable, file) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    return exit(`${variable}=${file}: ${err.message}`);
  }
}

// TLS credentials from the TOLLGATE_* variables, or plaintext ones.
function channelCredentials() {
  if ((TOLLGATE_CLIENT_CERT === null) !== (TOLLGATE_CLIENT_KEY === null)) {
    exit('TOLLGATE_CLIENT_CERT and TOLLGATE_CLIENT_KEY go together (mTLS needs both)');
  }
  if (TOLLGATE_CA_FILE === null) {
    if (TOLLGATE_CLIENT_CERT !== null) {
      exit('TOLLGATE_CLIENT_CERT needs TOLLGATE_CA_FILE (mTLS is TLS)');
    }
    if (TOLLGATE_TOKEN !== null) {
      console.error(
        'warning: TOLLGATE_TOKEN without TOLLGATE_CA_FILE: the token crosses the network' +
          ' in clear text',
      );
    }
    return grpc.credentials.createInsecure();
  }
  // Read once, at start: a rotated client certificate takes a restart of this app. The name
  // checked against tollgate's certificate is TOLLGATE_ADDR's host: use the name (or IP
  // address) the certificate carries, e.g. localhost:50051 for a local trial.
  let key = null;
  let chain = null;
  if (TOLLGATE_CLIENT_CERT !== null) {
    chain = readFile('TOLLGATE_CLIENT_CERT', TOLLGATE_CLIENT_CERT);
    key = readFile('TOLLGATE_CLIENT_KEY', TOLLGATE_CLIENT_KEY);
  }
  return grpc.credentials.createSsl(readFile('TOLLGATE_CA_FILE', TOLLGATE_CA_FILE), key, chain);
}

// One client for the whole process: it keeps one HTTP/2 connection open, so each chat costs a
// round trip, not a TCP (and TLS) handshake.
const quota = new tollgate.Quota(TOLLGATE_ADDR, channelCredentials(), {
  'grpc.service_config': JSON.stringify(serviceConfig),
});

// The token goes with every call, as metadata. (A call credential from
// grpc.credentials.createFromMetadataGenerator would do the same, but only on a TLS channel;
// metadata also works behind a mesh that does the TLS.)
function callMetadata() {
  const metadata = new grpc.Metadata();
  if (TOLLGATE_TOKEN !== null) metadata.set('authorization', `Bearer ${TOLLGATE_TOKEN}`);
  return metadata;
}

// Promise wrapper around a unary call, with its deadline.
function rpc(method, request) {
  return new Promise((resolve, reject) => {
    const options = { deadline: Date.now() + RPC_TIMEOUT_MS };
    quota[method](request, callMetadata(), options, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

class ProviderError extends Error {}

// Stands in for the provider call. Deterministic, so tests can rely on it. The completion never
// exceeds maxOutputTokens, just as a provider never returns more than max_tokens.
function simulatedLlmCall(model, prompt, maxOutputTokens, fail) {
  if (fail) throw new ProviderError('simulated provider failure');
  const words = prompt.split(/\s+/).filter(Boolean).length;
  const completionTokens = Math.min(maxOutputTokens, 10 + 2 * words);
  const reply = `[${model}] You said ${words} words; here are ${completionTokens} tokens back.`;
  return { reply, completionTokens };
}

// Retry-After in whole seconds, rounded up; null when tollgate says no wait can help.
function retryAfterSeconds(reserve) {
  // A message field that is absent stays null even with defaults: true.
  if (!reserve.retry_after) return null;
  return Math.ceil(reserve.retry_after.seconds + reserve.retry_after.nanos / 1e9);
}

// Handles one chat request. Returns { status, body, headers }.
async function chat(body, clientIp) {
  const { user, prompt } = body;
  if (typeof user !== 'string' || typeof prompt !== 'string') {
    return { status: 400, body: { error: 'user and prompt must be strings' } };
  }
  const model = body.model || DEFAULT_MODEL;
  if (typeof model !== 'string') return { status: 400, body: { error: 'model must be a string' } };
  const maxOutput = body.max_output_tokens ?? null;
  if (maxOutput !== null && !(Number.isInteger(maxOutput) && maxOutput >= 0)) {
    return { status: 400, body: { error: 'max_output_tokens must be a non-negative integer' } };
  }

  const request = {
    subject: user,
    model,
    // The prompt goes as text: tollgate counts it with the model's own tokenizer, so this app
    // needs no tokenizer, and the count matches what the provider will bill.
    prompt,
    // A fresh key per HTTP request: gRPC's automatic retries of this Reserve (above) then
    // return the first answer instead of holding the tokens twice.
    idempotency_key: crypto.randomUUID(),
    // The end user's address, so per-IP limits ([ip] in the policy) apply too. Behind a reverse
    // proxy this would come from X-Forwarded-For (from a proxy you trust).
    client_ip: clientIp,
  };
  if (maxOutput !== null) {
    // Optional in the proto: left out, tollgate holds the model's default output ceiling.
    request.max_output_tokens = maxOutput;
  }

  let reserve;
  try {
    reserve = await rpc('Reserve', request);
  } catch (err) {
    if (err.code === grpc.status.INVALID_ARGUMENT) {
      // A bad request (e.g. an unknown model): tollgate's message names the field and rule.
      return { status: 400, body: { error: err.details } };
    }
    // Tollgate unreachable or failing, or refusing this app (UNAUTHENTICATED: a missing or
    // unknown token or client certificate; PERMISSION_DENIED: a call or subject its [callers]
    // entry does not allow): this example fails closed (no budget check, no call). An app that
    // prefers availability over the budget could call the LLM anyway. The details (tollgate's
    // message says what is missing) go to the log, not the user.
    console.error(`reserve failed: ${grpc.status[err.code]}: ${err.details}`);
    return { status: 503, body: { error: `quota service unavailable: ${grpc.status[err.code]}` } };
  }

  if (reserve.decision === 'DECISION_DENIED') {
    // A denial is an answer, not an error: denied_by names the limit that said no.
    const wait = retryAfterSeconds(reserve);
    return {
      status: 429,
      body: { error: 'quota exceeded', denied_by: reserve.denied_by, retry_after_seconds: wait },
      headers: wait === null ? {} : { 'Retry-After': String(wait) },
    };
  }

  // ALLOWED or DOWNGRADED: call the model tollgate granted, which on a downgrade is a cheaper
  // one than asked for. The output hold is what was reserved beyond the prompt (when the
  // request left max_output_tokens out, that is tollgate's default ceiling).
  const granted = reserve.model;
  const outputHold = reserve.reserved_tokens - reserve.prompt_tokens;
  let result;
  try {
    result = simulatedLlmCall(granted, prompt, outputHold, body.fail === true);
  } catch (err) {
    if (!(err instanceof ProviderError)) throw err;
    // The call never happened: give the whole hold back rather than let it expire (an expired
    // hold is charged in full, on the assumption the call was made).
    try {
      await rpc('Refund', { reservation_id: reserve.reservation_id });
    } catch (refundErr) {
      console.error(`refund of ${reserve.reservation_id} failed: ${grpc.status[refundErr.code]}`);
    }
    return {
      status: 502,
      body: { error: `LLM call failed: ${err.message}`, reservation_id: reserve.reservation_id },
    };
  }

  // Charge what the provider reported. prompt_tokens is tollgate's own count for the granted
  // model; with a real provider, use the usage figures from its response instead.
  let charged = null;
  try {
    const commit = await rpc('Commit', {
      reservation_id: reserve.reservation_id,
      prompt_tokens: reserve.prompt_tokens,
      completion_tokens: result.completionTokens,
    });
    charged = commit.charged_tokens;
  } catch (err) {
    // The user already has the reply, so don't fail the request. The hold stays open and is
    // charged in full when it expires; a Commit within 24 h of that still reconciles.
    console.error(`commit of ${reserve.reservation_id} failed: ${grpc.status[err.code]}`);
  }

  return {
    status: 200,
    body: {
      reply: result.reply,
      model: granted,
      reservation_id: reserve.reservation_id,
      charged_tokens: charged,
      decision: reserve.decision.replace(/^DECISION_/, ''),
    },
  };
}

function respond(res, status, body, headers = {}) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(data),
    ...headers,
  });
  res.end(data);
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/chat') {
    return respond(res, 404, { error: 'not found' });
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      respond(res, 413, { error: 'body too large' });
      req.destroy();
    } else {
      chunks.push(chunk);
    }
  });
  req.on('end', async () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
    } catch {
      return respond(res, 400, { error: 'body must be JSON' });
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      return respond(res, 400, { error: 'body must be a JSON object' });
    }
    try {
      const { status, body: payload, headers } = await chat(body, req.socket.remoteAddress);
      respond(res, status, payload, headers);
    } catch (err) {
      console.error(err);
      respond(res, 500, { error: 'internal error' });
    }
  });
});

server.listen(PORT, HOST, () => {
  // scripts/check-clients.sh waits for "listening on" and reads the URL from this line.
  const url = `http://${HOST}:${server.address().port}`;
  let security = TOLLGATE_CA_FILE === null ? 'plaintext' : 'TLS';
  if (TOLLGATE_CLIENT_CERT !== null) security += ', client certificate';
  if (TOLLGATE_TOKEN !== null) security += ', bearer token';
  console.log(`chat example listening on ${url} (tollgate at ${TOLLGATE_ADDR}, ${security})`);
});
