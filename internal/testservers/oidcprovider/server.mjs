// A real OpenID provider (the npm package oidc-provider, OpenID Certified)
// for keygate's oauth2 tests. It serves the client-credentials grant with
// resource indicators (RFC 8707) and JWT access tokens (RFC 9068), signed
// with a key generated at start and published at jwks_uri, so a resource
// server can verify them.
//
// Started by internal/testservers/oidcprovider.go as
//   node server.mjs CONFIG.json
// with OIDC_PROVIDER_MODULE set to the absolute path of the installed
// package's entry point (scripts/oidc-provider.sh). CONFIG.json:
//   {"port": N, "issuer": "http://127.0.0.1:N",
//    "resource": "https://api.example.test", "scopes": ["read", "write"],
//    "access_token_ttl": 300,
//    "clients": [{"client_id", "client_secret"?, "token_endpoint_auth_method",
//                 "jwks"?: {"keys": [...]}, "scope"?: "read write"}]}
// It prints "ready" on stdout once listening.
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { generateKeyPairSync } from 'node:crypto';

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { default: Provider, errors } = await import(pathToFileURL(process.env.OIDC_PROVIDER_MODULE).href);

const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const signing = { ...privateKey.export({ format: 'jwk' }), kid: 'kg-test-es256', alg: 'ES256', use: 'sig' };

const scope = cfg.scopes.join(' ');
const provider = new Provider(cfg.issuer, {
  clients: cfg.clients.map((c) => ({
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope,
    ...c,
  })),
  jwks: { keys: [signing] },
  clientDefaults: { id_token_signed_response_alg: 'ES256' },
  scopes: cfg.scopes,
  ttl: { ClientCredentials: cfg.access_token_ttl },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => cfg.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        if (resourceIndicator !== cfg.resource) {
          throw new errors.InvalidTarget();
        }
        return {
          scope,
          audience: cfg.resource,
          accessTokenTTL: cfg.access_token_ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
});
// Errors are logged by name only (never the request).
provider.on('server_error', (ctx, err) => console.error('server_error', err && err.name));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err && err.name, err && err.error_description));

const server = provider.listen(cfg.port, '127.0.0.1', () => {
  console.log('ready');
});
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
