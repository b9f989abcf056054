// Package intercept is everything between a workload's socket and the
// upstream: the explicit proxy listener (absolute-form http:// and CONNECT,
// on goproxy), TLS interception under the broker CA, the upstream transport,
// the error-to-status table, the canonical audit line and the admin
// endpoints. goproxy types never leave this package.
//
// Security contract:
//   - Every request is attested and decided before anything is dialled; the
//     zero Decision denies. A CONNECT is decided on host:port and identity;
//     every request inside an intercepted tunnel is decided again.
//   - Destination binding: inside a tunnel the TLS SNI, the Host header and
//     an absolute-form URL must all name the CONNECT authority after
//     normalisation (NormalizeHost), else 421 and nothing is forwarded.
//   - Only a completed TLS handshake on the workload leg makes a request
//     https; plaintext inside a CONNECT tunnel is refused, and a credential is
//     injected into plain http:// only when the rule says allow_plaintext.
//   - One egress path (package egress) dials for tunnels and for upstream
//     requests; the transport never reads HTTP(S)_PROXY, always verifies
//     upstream TLS, and never follows redirects.
//   - Leaves are minted only after a rule allowed the host.
//   - Hop-by-hop headers, Proxy-Authorization and keygate's own headers are
//     stripped before injection; the injector owns its slot exclusively.
//   - Every workload HTTP/1 connection (front door, tunnel, redirected) is
//     read through a framing guard (framing.go) that refuses, with 400 and
//     a close, what Go's parser would hide or accept ambiguously: obs-fold,
//     Transfer-Encoding on HTTP/1.0 or beside Content-Length, malformed
//     chunk lines (bare LF or CR) and trailers. A refused request is never
//     decided, minted for or forwarded; a refusal ends the connection,
//     including any request still in flight on it. A refused request shape
//     (checkRequest) and a CONNECT that is not hijacked also end it.
//   - Upgrade never reaches an upstream, so no connection becomes raw
//     bytes: an upstream's 101 is answered 502, and Upgrade/Connection on
//     any other response are removed (no rule enables WebSocket yet).
//   - TRACE, TRACK and any request with Max-Forwards are answered 405. A
//     duplicated Content-Type, an Authorization pair not replaced by an
//     injection, and "." or ".." path segments (plain or encoded) are
//     refused, so a rule and an upstream cannot read different values.
//   - A panic while handling one request yields a 500 to that client only.
//     Header size limits and read-header timeouts apply inside tunnels too,
//     because each tunnel is served by its own net/http server. The byte
//     limit is exact (net/http's 4 KiB slack is taken off, and the framing
//     guard counts the head too); a head over it, or with more fields than
//     MaxHeaderCount, is 431 and a close, before attestation.
//   - Tunnels of every kind (intercepted, opaque, redirected) hold a slot of
//     one TunnelCap shared by the broker's listeners; past it a CONNECT is
//     503 tunnel_limit and nothing is dialled. A slot is released however
//     the tunnel ends, a panic included (limits.go).
//   - A leaf that is not cached is minted only within the caller identity's
//     MintLimiter budget; over it the CONNECT is 503 rate_limited before
//     anything is minted.
//   - A response to a request with an injected credential has that
//     credential's exact forms masked, same length, in headers, trailers
//     and an identity-encoded body (streamed); compressed bodies and
//     upgraded streams are not inspected.
//   - Nothing the workload or an upstream sends, and no credential value, is
//     copied into a log line verbatim except the request line's host, port
//     and path (never the query).
//
// Inside interception the broker speaks HTTP/1.1 only (ALPN http/1.1).
package intercept
