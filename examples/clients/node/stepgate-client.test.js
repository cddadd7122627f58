// Live tests of stepgate-client.js against the real stepgate binary and the demo policy.
//
// `before` starts `$STEPGATE_BIN serve` on an ephemeral port and waits for gRPC health SERVING;
// `after` stops it. Tokens are minted with `$STEPGATE_BIN token`; the client certificates of the
// certificate-bound token tests are made with the `openssl` command into a temporary folder.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { accessSync, constants, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { once } from 'node:events';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import {
  ALLOW, DENY, STEP_UP, authorizationOf, authorize, createClient, decide, toHttpReply, toStruct,
  upstreamHeaders,
} from './stepgate-client.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const CONFIG = path.join(REPO, 'examples/stepgate.yaml');
const START_DEADLINE_MS = 15_000;

const WIRE = 'payments.wire_transfer';
const C1_CLAIMS = { access_token: { acrs: { essential: true, value: 'c1' } } };
const C1_CLAIMS_B64 = 'eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19';
const ENTRA_CHALLENGE_PREFIX =
  'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", ' +
  'error="insufficient_claims", claims="';
const DEMO_TENANT = '72f988bf-86f1-41af-91ab-2d7cd011db47';

// grpc.health.v1.Health/Check, enough of it to ask for readiness (grpc-js ships no health proto).
const HEALTH = grpc.loadPackageDefinition(protoLoader.fromJSON({
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
    },
    Health: { methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } } },
  } } } } } } },
}, { enums: String })).grpc.health.v1;

function stepgateBin() {
  const hint = 'build it with `cargo build` and set STEPGATE_BIN=target/debug/stepgate, or run ./scripts/test';
  const bin = process.env.STEPGATE_BIN;
  if (!bin) throw new Error(`STEPGATE_BIN is not set: ${hint}`);
  const resolved = path.resolve(bin);
  try {
    accessSync(resolved, constants.X_OK);
  } catch {
    throw new Error(`STEPGATE_BIN=${resolved} is not an executable file: ${hint}`);
  }
  return resolved;
}

/** A demo token from `stepgate token ...args`. */
function mint(...args) {
  return execFileSync(stepgateBin(), ['token', ...args], { cwd: REPO, encoding: 'utf8', timeout: 30_000 }).trim();
}

/**
 * A self-signed EC P-256 certificate made in `dir` by the `openssl` command (node:crypto cannot sign
 * one): `{pem, der}`, the path of its PEM file (for `stepgate token --bound-to`) and its DER, as
 * `getPeerCertificate().raw` gives it.
 */
function selfSignedCertificate(dir, name) {
  const pem = path.join(dir, `${name}.crt`);
  const args = ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-keyout', path.join(dir, `${name}.key`), '-out', pem, '-days', '1', '-subj', `/CN=${name}`];
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 30_000 });
  } catch (error) {
    if (error.code === 'ENOENT') {
      throw new Error(
        'the certificate-bound token tests make their certificates with the `openssl` command: install OpenSSL',
      );
    }
    throw new Error(`openssl ${args.join(' ')} failed: ${error.stderr ?? error.message}`);
  }
  return { pem, der: new X509Certificate(readFileSync(pem)).raw };
}

/** Resolves to the address from stepgate's `stepgate listening on …` JSON log line on stderr. */
function listeningAddress(child, log) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`stepgate did not start listening in time:\n${log.join('\n')}`)),
      START_DEADLINE_MS,
    );
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`stepgate exited (${code ?? signal}) before listening:\n${log.join('\n')}`));
    });
    // stepgate logs every decision to stderr: the interface keeps draining it so the pipe never fills.
    createInterface({ input: child.stderr }).on('line', (line) => {
      log.push(line);
      let message = '';
      try {
        message = JSON.parse(line).message ?? '';
      } catch {
        return;
      }
      const match = /stepgate listening on (\S+)/.exec(message);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
  });
}

async function waitServing(address, log) {
  const health = new HEALTH.Health(address, grpc.credentials.createInsecure());
  try {
    const deadline = Date.now() + START_DEADLINE_MS;
    while (Date.now() < deadline) {
      const status = await new Promise((resolve) => {
        health.Check({ service: 'stepgate.v1.DecisionService' }, { deadline: Date.now() + 1000 },
          (error, response) => resolve(error ? null : response.status));
      });
      if (status === 'SERVING') return;
      await sleep(50);
    }
    throw new Error(`stepgate did not report SERVING in time:\n${log.join('\n')}`);
  } finally {
    health.close();
  }
}

// Counted as a failure (the suite's `before` failing only cancels its tests) with the reason.
test('STEPGATE_BIN names the stepgate binary', () => {
  stepgateBin();
});

describe('stepgate Decide (live)', () => {
  let child;
  let client;
  const log = [];
  const killOnExit = () => child?.kill('SIGKILL'); // if the runner dies before `after`

  before(async () => {
    child = spawn(stepgateBin(), ['serve', '--config', CONFIG, '--listen', '127.0.0.1:0', '--log-format', 'json'], {
      cwd: REPO,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    process.once('exit', killOnExit);
    const address = await listeningAddress(child, log);
    await waitServing(address, log);
    client = createClient(address);
  });

  after(async () => {
    client?.close();
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    process.off('exit', killOnExit);
  });

  // --- decide ------------------------------------------------------------------------------------

  test('ALLOW: wire transfer with c1', async () => {
    const token = mint('--acrs', 'c1', '--xms-cc', 'cp1');
    const r = await decide(client, { authorization: `Bearer ${token}`, operation: WIRE });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [ALLOW, 'wire-transfer', 'allowed', 200]);
    assert.equal(r.www_authenticate, '');
    assert.deepEqual(r.identity_headers, {
      'x-stepgate-subject': 'alice',
      'x-stepgate-tenant': DEMO_TENANT,
      'x-stepgate-auth-contexts': 'c1',
      'x-stepgate-rule': 'wire-transfer',
    });
    assert.deepEqual([r.principal.issuer_id, r.principal.subject, r.principal.acrs], ['demo-entra', 'alice', ['c1']]);
    assert.equal(typeof r.principal.expires_at, 'number');
    assert.equal(r.step_up, null);
    assert.match(r.token_fingerprint, /^[0-9a-f]{12}$/);
  });

  test('STEP_UP: Entra claims challenge for c1', async () => {
    const r = await decide(client, { token: mint('--xms-cc', 'cp1'), operation: WIRE });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [STEP_UP, 'wire-transfer', 'missing_auth_context', 401]);
    assert.equal(r.www_authenticate, `${ENTRA_CHALLENGE_PREFIX}${C1_CLAIMS_B64}"`);
    assert.deepEqual(JSON.parse(r.step_up.claims), C1_CLAIMS);
    assert.equal(Buffer.from(r.step_up.claims_base64, 'base64').toString(), r.step_up.claims);
    assert.equal(r.step_up.challenge_style, 'entra');
    assert.deepEqual(r.step_up.auth_contexts, ['c1']);
    assert.deepEqual(r.step_up.missing_auth_contexts, ['c1']);
    assert.equal(r.step_up.max_age_seconds, 900);
    assert.deepEqual(r.identity_headers, {});
  });

  test('DENY: no token is a bare 401', async () => {
    const r = await decide(client, { operation: WIRE });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [DENY, '', 'token_missing', 401]);
    assert.equal(r.www_authenticate, 'Bearer realm="stepgate-demo"');
    assert.equal(r.principal, null);
    assert.equal(r.step_up, null);
    assert.equal(r.token_fingerprint, '');
  });

  test('DENY: a client without cp1 cannot step up', async () => {
    const r = await decide(client, { token: mint(), operation: WIRE });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [DENY, 'wire-transfer', 'client_not_capable', 403]);
    assert.equal(r.www_authenticate, '');
    assert.deepEqual(r.step_up.missing_auth_contexts, ['c1']);
    assert.equal(r.principal.subject, 'alice');
  });

  test('STEP_UP: RFC 9470 challenge on an admin route', async () => {
    const token = mint('--issuer', 'oidc', '--roles', 'Admin'); // password only, no acr
    const r = await decide(client, { method: 'GET', path: '/admin/users', headers: { authorization: `Bearer ${token}` } });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [STEP_UP, 'admin', 'acr_not_accepted', 401]);
    assert.equal(r.www_authenticate,
      'Bearer realm="stepgate-demo", error="insufficient_user_authentication", ' +
      'error_description="authentication level urn:okta:loa:2fa:any or phr is required", ' +
      'acr_values="urn:okta:loa:2fa:any phr", max_age=3600');
    assert.equal(r.step_up.challenge_style, 'rfc9470');
    assert.deepEqual(r.step_up.acr_values, ['urn:okta:loa:2fa:any', 'phr']);
    assert.equal(r.step_up.max_age_seconds, 3600);
    assert.deepEqual(r.step_up.amr, ['mfa']);
    assert.deepEqual([r.step_up.claims, r.step_up.claims_base64], ['', '']);
  });

  test('ALLOW: RFC 9470 token after step-up', async () => {
    const token = mint('--issuer', 'oidc', '--roles', 'Admin', '--acr', 'urn:okta:loa:2fa:any', '--amr', 'pwd,mfa');
    const r = await decide(client, { authorization: `Bearer ${token}`, method: 'GET', path: '/admin/users' });
    assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [ALLOW, 'admin', 'allowed', 200]);
    assert.equal(r.principal.issuer_id, 'demo-oidc');
    assert.equal(r.identity_headers['x-stepgate-rule'], 'admin');
  });

  for (const [amount, outcome, missing] of [[5000, ALLOW, []], [25000, STEP_UP, ['c2']]]) {
    test(`risk escalation: amount ${amount} -> ${outcome}`, async () => {
      const token = mint('--acrs', 'c1', '--xms-cc', 'cp1');
      const r = await decide(client, { token, operation: WIRE, attributes: { amount, currency: 'EUR' } });
      assert.deepEqual([r.outcome, r.rule], [outcome, 'wire-transfer']);
      assert.deepEqual(r.step_up?.missing_auth_contexts ?? [], missing);
      if (outcome === STEP_UP) {
        assert.deepEqual(r.step_up.auth_contexts, ['c1', 'c2']);
        assert.deepEqual(JSON.parse(r.step_up.claims), { access_token: { acrs: { essential: true, value: 'c2' } } });
        assert.ok(r.www_authenticate.endsWith(`claims="${r.step_up.claims_base64}"`));
      }
    });
  }

  test('toStruct builds a google.protobuf.Struct', () => {
    assert.deepEqual(toStruct({ amount: 25000, currency: 'EUR', managed: true, tags: ['a'], extra: { n: null } }), {
      fields: {
        amount: { numberValue: 25000 },
        currency: { stringValue: 'EUR' },
        managed: { boolValue: true },
        tags: { listValue: { values: [{ stringValue: 'a' }] } },
        extra: { structValue: { fields: { n: { nullValue: 'NULL_VALUE' } } } },
      },
    });
  });

  test('neither operation nor http is a 400 denial, not a gRPC error', async () => {
    const r = await decide(client, {});
    assert.deepEqual([r.outcome, r.http_status, r.reason], [DENY, 400, 'malformed_request']);
    assert.match(r.message, /set operation, http, or both/);
  });

  test('an HTTP request without a method is refused, by the client and by stepgate', async () => {
    await assert.rejects(decide(client, { path: '/healthz' }), /method/);
    const raw = (http) =>
      new Promise((resolve, reject) =>
        client.Decide({ http }, { deadline: Date.now() + 5000 }, (e, r) => (e ? reject(e) : resolve(r))),
      );
    const none = await raw({ path: '/healthz' });
    assert.deepEqual([none.outcome, none.http_status, none.reason], [DENY, 400, 'malformed_request']);
    assert.match(none.message, /without a method/);
    // A method given only as `:method` is that method, not a default GET.
    const post = await raw({ path: '/healthz', headers: { ':method': 'POST' } });
    assert.notEqual(post.outcome, ALLOW);
    const get = await raw({ path: '/healthz', headers: { ':method': 'GET' } });
    assert.deepEqual([get.outcome, get.rule], [ALLOW, 'health']);
  });

  // --- toHttpReply / authorize ---------------------------------------------------------------------

  test('reply: ALLOW forwards identity headers upstream', async () => {
    const token = mint('--acrs', 'c1', '--xms-cc', 'cp1');
    const reply = await authorize(client, { authorization: `Bearer ${token}`, operation: WIRE });
    assert.equal(reply.status, 200);
    assert.equal(reply.body, null);
    assert.equal(reply.headers['x-stepgate-subject'], 'alice');
    assert.equal(reply.headers['x-stepgate-auth-contexts'], 'c1');
    assert.equal(reply.headers['www-authenticate'], undefined);
  });

  test('upstream headers: no spelling of a client header speaks for stepgate', async () => {
    const token = mint('--acrs', 'c1', '--xms-cc', 'cp1');
    const reply = await authorize(client, { authorization: `Bearer ${token}`, operation: WIRE });
    assert.equal(reply.status, 200);
    const upstream = upstreamHeaders({
      authorization: 'Bearer client-token',
      accept: 'application/json',
      'x-stepgate-subject': 'admin',
      // WSGI, Rack and PHP read these as the hyphenated names (HTTP_X_STEPGATE_...).
      x_stepgate_subject: 'admin',
      X_STEPGATE_AUTH_CONTEXTS: 'c1 c2 c3',
      'x-stepgate-acr': 'urn:spoofed',
    }, reply);
    assert.deepEqual(upstream, {
      authorization: 'Bearer client-token', // the demo policy keeps it (remove_authorization: false)
      accept: 'application/json',
      ...reply.headers,
    });
    assert.equal(upstream['x-stepgate-subject'], 'alice');
    assert.throws(() => upstreamHeaders({}, { status: 503, headers: {} }), TypeError);
    // What stepgate asks to remove is dropped in every spelling too.
    const removing = { status: 200, headers: { 'x-stepgate-subject': 'alice' }, remove: ['x-tenant-name', 'authorization'] };
    assert.deepEqual(
      upstreamHeaders({ Authorization: 'Bearer t', X_Tenant_Name: 'victim', accept: '*/*' }, removing),
      { accept: '*/*', 'x-stepgate-subject': 'alice' },
    );
  });

  test('authorizationOf: two Authorization lines reach stepgate as two credentials', async () => {
    const token = mint('--acrs', 'c1', '--xms-cc', 'cp1');
    // A real node:http server, sent two Authorization lines over a raw socket.
    const seen = new Promise((resolve) => {
      const server = http.createServer(async (req, res) => {
        const reply = await authorize(client, { authorization: authorizationOf(req), operation: WIRE });
        res.writeHead(reply.status).end();
        server.close();
        resolve({ first: req.headers.authorization, status: reply.status });
      });
      server.listen(0, '127.0.0.1', () => {
        const socket = net.connect(server.address().port, '127.0.0.1', () => {
          socket.end(`GET /pay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n`
            + 'Authorization: Bearer second\r\nConnection: close\r\n\r\n');
        });
        socket.resume();
      });
    });
    const { first, status } = await seen;
    assert.equal(first, `Bearer ${token}`, 'node:http keeps only the first line in req.headers');
    assert.equal(status, 400, 'stepgate refuses two credentials');
  });

  test('reply: STEP_UP is 401 with the claims challenge', async () => {
    const reply = await authorize(client, { token: mint('--xms-cc', 'cp1'), operation: WIRE });
    assert.equal(reply.status, 401);
    assert.deepEqual(reply.headers, {
      'content-type': 'application/json',
      'www-authenticate': `${ENTRA_CHALLENGE_PREFIX}${C1_CLAIMS_B64}"`,
    });
    assert.deepEqual(JSON.parse(reply.body), {
      error: 'insufficient_claims',
      reason: 'missing_auth_context',
      rule: 'wire-transfer',
      message: 'authentication context c1 is required',
    });
  });

  test('reply: no token is a bare 401', async () => {
    const reply = await authorize(client, { operation: WIRE });
    assert.equal(reply.status, 401);
    assert.equal(reply.headers['www-authenticate'], 'Bearer realm="stepgate-demo"');
    const body = JSON.parse(reply.body);
    assert.deepEqual([body.error, body.reason, body.rule], ['unauthorized', 'token_missing', null]);
  });

  test('reply: client_not_capable is 403 without a challenge', async () => {
    const reply = await authorize(client, { token: mint(), operation: WIRE });
    assert.equal(reply.status, 403);
    assert.deepEqual(reply.headers, { 'content-type': 'application/json' });
    const body = JSON.parse(reply.body);
    assert.deepEqual([body.error, body.reason, body.rule], ['access_denied', 'client_not_capable', 'wire-transfer']);
  });

  test('reply: RFC 9470 step-up', async () => {
    const token = mint('--issuer', 'oidc', '--roles', 'Admin');
    const reply = await authorize(client, { token, method: 'DELETE', path: '/admin/users/7' });
    assert.equal(reply.status, 401);
    assert.ok(reply.headers['www-authenticate'].includes('acr_values="urn:okta:loa:2fa:any phr", max_age=3600'));
    assert.equal(JSON.parse(reply.body).error, 'insufficient_user_authentication');
  });

  test('reply: an unusable request is 400', async () => {
    const reply = await authorize(client, {});
    assert.equal(reply.status, 400);
    assert.equal(JSON.parse(reply.body).reason, 'malformed_request');
  });

  test('reply: an unreachable stepgate fails closed', async () => {
    const dead = createClient('127.0.0.1:1'); // nothing listens on port 1
    try {
      assert.equal((await authorize(dead, { operation: WIRE }, { timeoutMs: 2000 })).status, 503);
    } finally {
      dead.close();
    }
  });

  test('reply: an unknown outcome fails closed', () => {
    assert.equal(toHttpReply({ outcome: 'OUTCOME_UNSPECIFIED', http_status: 0 }).status, 503);
    assert.equal(toHttpReply(undefined).status, 503);
  });

  // --- certificate-bound tokens (RFC 8705) ---------------------------------------------------------

  describe('certificate-bound tokens', () => {
    let dir;
    let made;
    // Made on first use rather than in `before`, so a missing openssl fails these tests (a failing
    // hook would only cancel them).
    const certificates = () => {
      if (!made) {
        dir ??= mkdtempSync(path.join(os.tmpdir(), 'stepgate-node-certs-'));
        made = { client: selfSignedCertificate(dir, 'client'), other: selfSignedCertificate(dir, 'other') };
      }
      return made;
    };
    /** A demo token whose `cnf` holds the `x5t#S256` of the `client` certificate. */
    const boundToken = () => mint('--bound-to', certificates().client.pem);
    const READ = 'accounts.read'; // the demo policy's `everything-else` rule: any valid token
    const INVALID_TOKEN_CHALLENGE = /^Bearer realm="stepgate-demo", error="invalid_token", error_description="/;

    after(() => {
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    test('ALLOW: a bound token with its certificate', async () => {
      const token = boundToken();
      const { der } = certificates().client;
      const r = await decide(client, { token, operation: READ, clientCertificate: der });
      assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [ALLOW, 'everything-else', 'allowed', 200]);
      const reply = await authorize(client, { authorization: `Bearer ${token}`, operation: READ, clientCertificate: der });
      assert.deepEqual([reply.status, reply.headers['x-stepgate-subject']], [200, 'alice']);
    });

    test('DENY: a bound token with another certificate is an invalid token', async () => {
      const token = boundToken();
      const { der } = certificates().other;
      const reply = await authorize(client, { authorization: `Bearer ${token}`, operation: READ, clientCertificate: der });
      assert.equal(reply.status, 401);
      assert.match(reply.headers['www-authenticate'], INVALID_TOKEN_CHALLENGE);
      const body = JSON.parse(reply.body);
      assert.deepEqual([body.error, body.reason, body.rule], ['invalid_token', 'client_certificate_mismatch', null]);
    });

    test('DENY: a bound token without a certificate is an invalid token', async () => {
      const reply = await authorize(client, { authorization: `Bearer ${boundToken()}`, operation: READ });
      assert.equal(reply.status, 401);
      assert.match(reply.headers['www-authenticate'], INVALID_TOKEN_CHALLENGE);
      const body = JSON.parse(reply.body);
      assert.deepEqual([body.error, body.reason, body.rule], ['invalid_token', 'client_certificate_missing', null]);
    });

    test('ALLOW: a bearer token ignores a client certificate', async () => {
      const r = await decide(client, { token: mint(), operation: READ, clientCertificate: certificates().other.der });
      assert.deepEqual([r.outcome, r.rule, r.reason, r.http_status], [ALLOW, 'everything-else', 'allowed', 200]);
    });

    test('a client certificate must be DER bytes, not PEM text', async () => {
      // proto-loader would read a string as base64: the client refuses it, and authorize fails closed.
      const pem = readFileSync(certificates().client.pem, 'utf8');
      const request = { token: boundToken(), operation: READ, clientCertificate: pem };
      await assert.rejects(decide(client, request), TypeError);
      assert.equal((await authorize(client, request)).status, 503);
    });
  });
});
