// Package inject turns config into credentials and writes them into
// requests: secret references (ResolveRef), credential sources (NewStatic,
// NewSTS, NewVaultKV and NewVaultDynamic on a NewVault connection,
// NewOAuth2, NewGitHubApp), the caching decorator (NewCache), the
// per-request parameter decorator (WithParams) and the injectors (Bearer,
// Basic, Header, Query, SigV4).
//
// AWS STS. NewSTS mints a session per call with AssumeRole (the broker's
// base credentials from the SDK default chain) or AssumeRoleWithWebIdentity
// (the broker's own token: FileToken, JWTSVIDToken). The session name and
// source identity derive from the workload identity (SessionName); session
// tags and the inline session policy arrive as grant parameters, computed
// per request by WithParams outside the cache so that they are part of the
// cache key: a caller never receives a session scoped for another caller or
// another policy. Tag values are validated, never rewritten. STS failures
// become 503 credential_unavailable with the STS operation and error code
// (and Retry-After on throttling); at most one retry per call, bounded by
// STSOptions.Timeout.
//
// OAuth2 (oauth2.go). NewOAuth2 runs the client-credentials grant with
// golang.org/x/oauth2/clientcredentials per call: client_secret_basic,
// client_secret_post or private_key_jwt (an RFC 7523 assertion signed with
// go-jose, fresh jti, one minute), scopes static or from the grant
// parameter ParamOAuth2Scopes (canonical: sorted, unique, so part of the
// cache key), audience and resource parameters. The token's expiry is the
// call's Clock time plus expires_in; without expires_in it is
// DefaultOAuth2Lifetime (60s), so a token of unknown life is kept briefly,
// never indefinitely. x/oauth2's error strings (which quote bodies) are
// never passed on: an OAuth error answer or an unreachable endpoint is 503
// credential_unavailable with the status and the RFC 6749 error code (not
// repeated when it is outside RFC 6749's characters or holds the secret);
// garbage, a token with control characters, a non-Bearer token_type, a
// negative expires_in or the client's own secret echoed back as the token
// are 502 credential_malformed. Descriptions go to the cause (the log) with
// the client secret and assertion removed.
//
// GitHub App (github_app.go). NewGitHubApp signs the app JWT (RS256,
// iat-60s, exp+9m), finds the installation of the repositories
// (GET /repos/{owner}/{repo}/installation, or /orgs/{org}/installation for
// an owner alone, or the configured installation_id, which also pins the
// lookup's answer) and exchanges it (POST
// /app/installations/{id}/access_tokens) with the repository names and
// permissions, static or from ParamGitHubRepositories and
// ParamGitHubPermissions (canonical, validated: owner/repo of GitHub's
// characters, one owner, levels read/write/admin). The credential has
// token, username x-access-token and password, expires at expires_at. A
// 404 lookup is 503 naming the app and the repository; a bad answer is 502.
// Both token sources use the broker's own client (no proxy, no redirects).
//
// # Security contract
//
// Values never leak. Credential values travel as broker.Secret and are
// revealed only inside an injector, at the moment they are written. No
// error, metric label or panic message of this package contains a value:
// errors name the credential, the field, the env variable or the file path
// and the reason. A reference that is neither env: nor file: is not echoed
// (it may be a secret pasted in by mistake). A source panic is reported
// without its panic value.
//
// References. Secrets appear in config only as "env:NAME" (set and
// non-empty) or "file:PATH" (at most 1 MiB, non-empty). From a file exactly
// one trailing "\n" or "\r\n" is stripped and nothing else, so a file
// ending in two newlines yields a value ending in one, which every injector
// rejects. ResolveRef itself accepts control characters because some
// sources need multi-line secrets (PEM keys); ValidateRef checks syntax only
// and does no I/O.
//
// Injection replaces, never appends. Every injector validates first and
// changes nothing on error; then it deletes every variant of the slot it
// owns and sets exactly one value:
//   - Bearer and Basic own Authorization; Header owns its header name. All
//     keys equal to the name under strings.EqualFold are deleted with all
//     their values, including non-canonical keys stored as sent (goproxy
//     PreventCanonicalization) and keys written into the map directly. The
//     value is set under the canonical name.
//   - Query owns its parameter name, case-sensitively (HTTP query names
//     are): every pair whose percent-decoded key equals the name is
//     removed, and so is an '&' segment holding it after a ';'. Other pairs
//     keep their bytes and order; the injected pair is appended.
//   - An injector owns nothing else. Proxy-Authorization, hop-by-hop
//     headers, headers named in Connection, request trailers and internal
//     headers are stripped by package intercept before injection (T-B5).
//
// Values are checked before they are written (CheckValue, T-B6): no ASCII
// control character except tab (so no CR, LF, NUL or DEL) in any field or
// in the formatted result, at most MaxValueLen (8 KiB) after formatting, and
// a missing or empty field is an error. Basic refuses a username with ':'.
// Header refuses hop-by-hop, framing, Host, Proxy-* and X-Keygate-* /
// X-Broker-* names and formats without a {{field}} placeholder.
//
// SigV4 re-signs an AWS request (sent unsigned or signed with dummy keys)
// with aws-sdk-go-v2's signer/v4, from access_key_id, secret_access_key and
// the optional session_token. It owns Authorization, X-Amz-Date,
// X-Amz-Security-Token and X-Amz-Content-Sha256 in every case; before
// signing it merges non-canonical header keys into their canonical key (the
// signer and the transport would otherwise disagree on order) and leaves
// hop-by-hop and Trailer headers out of the signature. The signed host is
// the one the transport sends (r.Host, else the URL host, punycoded, default
// port stripped). Service and region come from the rule or InferSigV4; a
// host it does not recognise fails closed. The payload hash follows the
// client's X-Amz-Content-Sha256: UNSIGNED-PAYLOAD,
// STREAMING-UNSIGNED-PAYLOAD-TRAILER or a hex digest are kept and the body
// is not read; STREAMING-AWS4-* (chunk signatures chained to the request
// signature) and other values are refused (400); with no header the body is
// buffered up to MaxBody (default 16 MiB; above it 413) and hashed, and for
// S3 the hash is also sent as the header. Query-signed (pre-signed) URLs and
// queries url.ParseQuery rejects are refused rather than rewritten. A fresh
// signer is used per request: the library's derived-key cache is keyed by
// access key id, day, region and service, not by secret, so a shared signer
// would keep signing with a rotated-out secret.
//
// The cache never crosses callers (T-B7). Its key is an injective
// (length-prefixed) encoding of the credential name, the rule, the
// identity's method, trust domain, ID and delegator, and every grant
// parameter, plus broker.Grant.CacheKey. The target host is not part of the
// key: the rule already bounds where a credential may go, and a source
// whose output depends on the target must receive it through Grant.Params.
//
// The cache never serves a stale or failed credential. An entry lives
// min(TTL, Expires-Margin) and is checked against the Clock on every hit,
// twice (F-17): against the wall clock, and against the monotonic time
// elapsed since the credential was fetched, its lifetime (Expires minus
// the wall time of the fetch, the shorter of the readings before and after
// the source call) counted from the fetch. It is expired as soon as either
// says so, so a wall clock stepped back cannot stretch a credential past
// its true lifetime, and one stepped forward still ends it early. The
// refresh window, the refresh back-off and lease renewals are judged the
// same way. The monotonic time is the Clock's when it implements
// Monotonic, else the reading time.Now carries (broker.SystemClock).
// With CacheOptions.Refresh (aws_sts sets it through RefreshHinter: margin
// 60s, refresh 5m) a hit inside the refresh window starts one background
// replacement; the old credential is served until its margin, so an STS
// outage in that window costs nothing, and is never served after it. The
// sigv4 injector itself refuses a credential within 60s of its Expires
// (MinSigV4Lifetime, 503), whatever path it came by.
// A credential the source returns already expired is an error (and is
// released). A fresh credential already inside its margin is handed to the
// callers that waited for it but not stored. Errors are never cached.
// Credentials with a Release function (one-shot leases) are never cached
// or shared: exactly one caller receives each, and a lease whose caller has
// gone is released at once. The exception is CacheOptions.ShareLeases
// (vault_dynamic with a cache): the cache then owns the lease, every caller
// gets a Release that only ends its own use, the lease is renewed while
// used (Renew) and its own Release runs exactly once, after it has left the
// cache and its last user is done. Close releases every stored lease.
//
// Vault (vault.go) never follows a redirect, never uses a proxy, ignores
// VAULT_* unless told otherwise, and summarises every failure in a fixed
// vocabulary: Vault's error bodies can quote the request and are never
// passed on. Path templates (ParseVaultPath) substitute only values of
// [A-Za-z0-9._@+=-] without "..", so a claim cannot walk the path.
//
// Concurrent misses for one key make one source call (singleflight). That
// call runs on context.WithoutCancel of the first caller's context, bounded
// by CacheOptions.FetchTimeout (default 30s), so a caller that gives up
// returns at once with its own context error without failing the others.
// Every caller receives its own copy of Fields and Meta.
//
// Metrics (DESIGN.md §8): keygate_credential_fetches_total{credential,
// result} counts each call of a Source built by NewCache once: "ok" when
// that call reached the source and succeeded, "cache_hit" when it was served
// from the cache or from another caller's in-flight fetch, "error" when it
// failed (source error, expired credential, or the caller's context ended).
// keygate_credential_fetch_duration_seconds{credential} times the source
// calls only.
package inject
