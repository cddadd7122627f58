// oauth2-mock-server as an independent identity provider for stepgate's key-lifecycle tests
// (tests/idp_lifecycle.rs). Starts on 127.0.0.1 with an ephemeral port and one fresh RS256 key,
// shapes issued access tokens like an API's user token (aud api://stepgate-demo, sub, scp; no
// tid), prints one JSON line {"issuer": "...", "port": N} to stdout, and runs until stdin closes
// or it is killed.
//
// Install once with `npm ci --prefix tests/idp` (./scripts/setup-peers does it).
import { OAuth2Server } from 'oauth2-mock-server';

const AUDIENCE = 'api://stepgate-demo';

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

server.service.on('beforeTokenSigning', (token) => {
  token.payload.aud = AUDIENCE;
  token.payload.sub = 'mock-user';
  token.payload.scp = 'user_impersonation';
  // The client-credentials grant sets `scope` to the request's (often absent) value.
  if (token.payload.scope === undefined) delete token.payload.scope;
});

await server.start(0, '127.0.0.1');
process.stdout.write(
  `${JSON.stringify({ issuer: server.issuer.url, port: server.address().port })}\n`,
);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  try {
    await server.stop();
  } finally {
    process.exit(0);
  }
};
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.resume();
