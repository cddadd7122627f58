// A minimal Node caller of stepgate's `stepgate.v1.DecisionService/Decide` RPC.
//
// A Node web service that is not behind Envoy asks stepgate, for each request it serves, whether
// that request may go ahead with the authentication its access token carries, and answers the way
// stepgate says:
//
//   const stepgate = createClient('127.0.0.1:50051');      // one client for the whole process
//
//   async function handle(req, res) {                      // node:http
//     const reply = await authorize(stepgate, {
//       authorization: authorizationOf(req),               // every Authorization line
//       operation: 'payments.wire_transfer',
//       attributes: { amount: 25000 },
//     });
//     if (reply.status !== 200) {                          // 401 / 403 / 400 / 503, as is
//       res.writeHead(reply.status, reply.headers).end(reply.body);
//       return;
//     }
//     await callUpstream(req, upstreamHeaders(req.headers, reply));
//   }
//
// The proto is loaded from `proto/` of this repository at run time, so nothing generated is
// committed and the client cannot drift from the proto it is shipped with.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));

/** `proto/` of the stepgate checkout this file lives in; override with STEPGATE_PROTO_DIR. */
export const PROTO_DIR = process.env.STEPGATE_PROTO_DIR || path.resolve(here, '../../../proto');

/**
 * How proto-loader maps messages to plain objects. keepCase: field names exactly as in the proto
 * (`http_status`, `www_authenticate`); longs as Number (the int64/uint64 fields are seconds, far
 * below 2^53); enums as their names (`OUTCOME_ALLOW`); defaults so absent fields read as
 * ''/0/[]/{} rather than undefined; oneofs so a message says which credential field is set.
 */
export const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR], // google/protobuf/struct.proto comes with protobufjs
};

const definition = protoLoader.loadSync('stepgate/v1/decision.proto', LOADER_OPTIONS);
const { DecisionService } = grpc.loadPackageDefinition(definition).stepgate.v1;

export const ALLOW = 'OUTCOME_ALLOW';
export const STEP_UP = 'OUTCOME_STEP_UP';
export const DENY = 'OUTCOME_DENY';

/**
 * Authorization sits in the request path: a slow stepgate must not hang the service. When the
 * deadline passes the call fails with DEADLINE_EXCEEDED and the request is refused (fail closed).
 */
export const DEFAULT_TIMEOUT_MS = 2000;

/** A DecisionService client. Create one per process and reuse it: it keeps the connection. */
export function createClient(target, credentials = grpc.credentials.createInsecure()) {
  return new DecisionService(target, credentials);
}

/**
 * A plain object as a `google.protobuf.Struct` in proto-loader's object form. proto-loader does
 * not convert well-known types: `{amount: 25000}` must be sent as
 * `{fields: {amount: {numberValue: 25000}}}`. The Struct types come from protobufjs's bundled
 * definitions, whose field names are camelCase even with keepCase: true. A key it does not know
 * (`number_value`) is dropped silently and stepgate sees `amount: null` — so build Structs only
 * through here.
 */
export function toStruct(object) {
  return {
    fields: Object.fromEntries(Object.entries(object).map(([key, value]) => [key, toValue(value)])),
  };
}

function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  switch (typeof value) {
    case 'number':
      return { numberValue: value }; // stepgate's conditions see every number as a double
    case 'string':
      return { stringValue: value };
    case 'boolean':
      return { boolValue: value };
    case 'object':
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`cannot send a ${typeof value} in a google.protobuf.Struct`);
  }
}

/**
 * Asks stepgate for a decision; resolves to the DecideResponse as a plain object.
 *
 * Pass the client's `Authorization` header value untouched as `authorization` rather than
 * extracting the token yourself: stepgate then also catches a wrong scheme or two credentials
 * (400 invalid_request). Use `token` only when you hold a bare token.
 *
 * `operation` names what is being attempted (`payments.wire_transfer`) for rules with an
 * `operation` matcher; `method`/`path`/`host`/`headers` describe the HTTP request so route rules
 * apply (`method` is required with them). At least one of the two is required. `attributes` is a plain object for the policy's
 * conditions, sent as a Struct.
 *
 * `clientCertificate` is the DER (a Buffer) of the certificate the *end client* authenticated its
 * TLS connection to this service with (the leaf alone; not the certificate of this service's own
 * channel to stepgate). A token bound to a certificate (`cnf` holding `x5t#S256`, RFC 8705) is good
 * only with it: without it the answer is `401 client_certificate_missing`, with another certificate
 * `401 client_certificate_mismatch`, both with an `error="invalid_token"` challenge. stepgate reads
 * it for bound tokens only, so pass it whenever you have it. Where it comes from:
 *
 * - A Node server terminating TLS itself, asking for client certificates (`https.createServer`
 *   with `requestCert: true`; `rejectUnauthorized: false` if it must also take self-signed ones,
 *   RFC 8705 §3): `req.socket.getPeerCertificate()?.raw` (`tlsSocket.getPeerCertificate().raw`),
 *   `undefined` when the client sent none, which is what to pass then.
 * - Behind a proxy that terminates TLS (nginx, Envoy, a load balancer): the service's own
 *   connection is to the proxy, so the certificate must come from the proxy, in a header it
 *   overwrites on every request (nginx `$ssl_client_escaped_cert`, Envoy's
 *   `x-forwarded-client-cert` `Cert=`: URL-encoded PEM, so
 *   `new X509Certificate(decodeURIComponent(value)).raw`). Never read such a header a client could
 *   set itself.
 *
 * Anything but a Buffer or Uint8Array is refused (TypeError): proto-loader would take a string as
 * base64 of the bytes, so PEM text or hex would not be sent as the certificate it is.
 *
 * Every request is answered with an OK gRPC status: read `outcome`. That holds for DENY, for a
 * request stepgate cannot decide on (`400 malformed_request`: neither operation nor http) and for
 * a failure inside stepgate (`500 internal_error`). The promise rejects with a gRPC error
 * (`err.code`, `err.details`) only when stepgate could not answer at all (UNAVAILABLE,
 * DEADLINE_EXCEEDED, ...); the caller must treat that as "not allowed" — `authorize` does.
 */
export function decide(client, request = {}, { timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
  const { authorization, token, operation = '', method, path: target, host, headers } = request;
  const { attributes, clientCertificate, explain = false } = request;
  if (authorization !== undefined && token !== undefined) {
    return Promise.reject(new TypeError('pass authorization or token, not both (they are one oneof)'));
  }
  if (!method && [target, host, headers].some((v) => v !== undefined)) {
    // stepgate refuses an HTTP request without a method (400 malformed_request).
    return Promise.reject(new TypeError("pass the HTTP request's method with its path, host or headers"));
  }
  const hasCertificate = clientCertificate !== undefined && clientCertificate !== null;
  if (hasCertificate && !(clientCertificate instanceof Uint8Array)) {
    return Promise.reject(new TypeError('pass clientCertificate as a Buffer of DER (getPeerCertificate().raw)'));
  }
  const message = { operation, explain };
  if (authorization !== undefined) message.authorization = authorization;
  if (token !== undefined) message.token = token;
  // `http` is a message: merely present (even empty) it is validated, so set it only when used.
  if ([method, target, host, headers].some((v) => v !== undefined)) {
    message.http = { method, path: target ?? '', host: host ?? '', headers: headers ?? {} };
  }
  if (attributes !== undefined) message.attributes = toStruct(attributes);
  if (hasCertificate) message.client_certificate = clientCertificate;
  return new Promise((resolve, reject) => {
    client.Decide(message, { deadline: Date.now() + timeoutMs }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/**
 * The client's `Authorization` header as stepgate must see it: every line it sent, joined with
 * `, ` as a proxy joins them. `node:http` keeps only the first of repeated `Authorization` lines in
 * `req.headers`, so a request with two tokens would be decided on one; joined, stepgate refuses it
 * (400 invalid_request). `undefined` when there is none.
 */
export function authorizationOf(req) {
  const lines = req.headersDistinct?.authorization;
  if (lines === undefined) return req.headers.authorization;
  return lines.join(', ');
}

/** A header name as servers that read `_` as `-` read it (WSGI, Rack, PHP, CGI). */
function headerKey(name) {
  return name.toLowerCase().replaceAll('_', '-');
}

/**
 * The headers to send upstream for an ALLOW reply: the client's `headers`, without any it could
 * speak for stepgate with — every `x-stepgate-*`, every header stepgate sets or asks to remove
 * (`reply.remove`: identity headers it left unset, `authorization` when the policy says so), in any
 * case and spelled with `_` for `-` (`x_stepgate_subject` is `x-stepgate-subject` to WSGI, Rack and
 * PHP) — and then stepgate's identity headers. Throws for a reply that is not an ALLOW.
 */
export function upstreamHeaders(headers, reply) {
  if (reply.status !== 200) throw new TypeError('upstream headers are for an ALLOW (status 200) only');
  const dropped = new Set([...Object.keys(reply.headers), ...(reply.remove ?? [])].map(headerKey));
  const upstream = Object.fromEntries(
    Object.entries(headers).filter(([name]) => {
      const key = headerKey(name);
      return !key.startsWith('x-stepgate-') && !dropped.has(key);
    }),
  );
  return Object.assign(upstream, reply.headers);
}

/**
 * The reply when stepgate could not be asked, or refused the question: the request must not go
 * ahead, and the client learns nothing about the policy or the error. 503: the fault is ours.
 */
export function failClosed() {
  return {
    status: 503,
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ error: 'temporarily_unavailable', reason: 'authorization_unavailable' }),
  };
}

/**
 * Maps a Decide response (or the error the call failed with) to the service's HTTP reply
 * `{status, headers, body}`.
 *
 * ALLOW: status 200, `headers` are the identity headers to *add to the upstream request*,
 * `remove` the `headers_to_remove`, body null. Before adding them, drop the headers of the same
 * family the client sent: stepgate sets only the headers it has values for, so a configured one it
 * leaves unset (no `tid` in the token, say) would otherwise reach the upstream with the client's
 * value, and a client's `x_stepgate_subject` is `x-stepgate-subject` to a WSGI, Rack or PHP
 * upstream. `upstreamHeaders` does both.
 *
 * STEP_UP / DENY: `http_status` as is, and `www-authenticate` when stepgate gives one — it is the
 * challenge (Entra claims challenge or RFC 9470) the client's identity library acts on, so it must
 * be passed through byte for byte. The JSON body mirrors the one stepgate's Envoy door sends:
 * `{error, reason, rule, message}`.
 *
 * Anything else — an Error, or an outcome this client does not know — fails closed (503).
 */
export function toHttpReply(response) {
  if (!response || response instanceof Error) return failClosed();
  if (response.outcome === ALLOW) {
    return {
      status: 200,
      headers: { ...response.identity_headers },
      body: null,
      remove: [...(response.headers_to_remove ?? [])],
    };
  }
  if (response.outcome !== STEP_UP && response.outcome !== DENY) return failClosed();
  const headers = { 'content-type': 'application/json' };
  if (response.www_authenticate) headers['www-authenticate'] = response.www_authenticate;
  const body = {
    error: oauthError(response),
    reason: response.reason,
    rule: response.rule || null,
    message: response.message,
  };
  return { status: response.http_status || 403, headers, body: JSON.stringify(body) };
}

/**
 * `decide` + `toHttpReply` in one call, with `decide`'s request fields — among them
 * `clientCertificate`, the DER of the end client's TLS certificate
 * (`tlsSocket.getPeerCertificate().raw`) for certificate-bound tokens. Never rejects: a gRPC error
 * or a request `decide` refuses to send fails closed (503).
 */
export async function authorize(client, request, options) {
  try {
    return toHttpReply(await decide(client, request, options));
  } catch (error) {
    return toHttpReply(error);
  }
}

/** The challenge's OAuth `error` code, or a generic one when there is no challenge. */
function oauthError(response) {
  const match = /\berror="([^"]*)"/.exec(response.www_authenticate);
  if (match) return match[1];
  if (response.outcome === STEP_UP) return 'insufficient_user_authentication';
  return response.http_status === 401 ? 'unauthorized' : 'access_denied';
}
