// A real OpenID Provider (node oidc-provider) for the identity-provider integration tests.
//
//   node tests/idp/provider.mjs PORT STATE_FILE
//
// OIDC_PROVIDER_MODULE names the installed oidc-provider package folder (make test installs it under .cache/).
// Clients use the client-credentials grant with a resource indicator; access tokens are RFC 9068 JWTs (typ at+jwt)
// signed with the active key. The signing keys live in STATE_FILE, so a provider stopped and started again keeps
// them. Admin hooks (POST, loopback only):
//   /admin/keys/add             a new RSA key, published and active at once; answers {"kid": ...}
//   /admin/keys/remove?kid=K    stop publishing K (the newest remaining key becomes the active one)
//   /admin/jwks?up=0|1          the JWKS endpoint answers 503 while down
//   /admin/clock?offset=S       this provider's clock runs S seconds ahead (token iat/nbf/exp)
//   /admin/gen?client=C&value=N tokens of client C carry the claim gen=N (value empty: no gen claim)
// It prints "ready" once it listens.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [port, stateFile] = process.argv.slice(2);
const moduleDir = process.env.OIDC_PROVIDER_MODULE;
const { default: Provider } = await import(pathToFileURL(join(moduleDir, 'lib', 'index.js')).href);

const issuer = `http://127.0.0.1:${port}`;
export const RESOURCE = 'https://api.test';
const CLIENTS = ['svc-a', 'svc-b', 'svc-c', 'svc-gen'];

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: `k-${randomUUID().slice(0, 8)}`, use: 'sig', alg: 'RS256' };
}

const state = existsSync(stateFile)
  ? JSON.parse(readFileSync(stateFile, 'utf8'))
  : { keys: [newKey()], gen: {} };
const save = () => writeFileSync(stateFile, JSON.stringify(state));
save();

let jwksUp = true;
let offset = 0;
const realNow = Date.now.bind(Date);
Date.now = () => realNow() + offset * 1000;

function build() {
  const active = state.keys[state.keys.length - 1].kid;
  const provider = new Provider(issuer, {
    clients: CLIENTS.map((id) => ({
      client_id: id,
      client_secret: `secret-${id}`,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_basic',
    })),
    jwks: { keys: state.keys },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'things:read things:write',
          audience: RESOURCE,
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256', kid: active } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => {
      const gen = state.gen[token.clientId];
      return gen === undefined ? undefined : { gen };
    },
  });
  provider.use(async (ctx, next) => {
    if (ctx.path === '/jwks' && !jwksUp) {
      ctx.status = 503;
      ctx.body = 'down';
      return;
    }
    await next();
  });
  return provider.callback();
}

let handler = build();

function admin(url, res) {
  const q = url.searchParams;
  let body = { ok: true };
  if (url.pathname === '/admin/keys/add') {
    const key = newKey();
    state.keys.push(key);
    body = { kid: key.kid };
  } else if (url.pathname === '/admin/keys/remove') {
    state.keys = state.keys.filter((k) => k.kid !== q.get('kid'));
  } else if (url.pathname === '/admin/jwks') {
    jwksUp = q.get('up') === '1';
  } else if (url.pathname === '/admin/clock') {
    offset = Number(q.get('offset'));
  } else if (url.pathname === '/admin/gen') {
    if (q.get('value')) state.gen[q.get('client')] = Number(q.get('value'));
    else delete state.gen[q.get('client')];
  } else {
    res.writeHead(404).end();
    return;
  }
  save();
  handler = build();
  res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

createServer((req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/admin/') && req.method === 'POST') admin(url, res);
  else handler(req, res);
}).listen(Number(port), '127.0.0.1', () => console.log('ready'));
