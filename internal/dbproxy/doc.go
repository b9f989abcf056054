// Package dbproxy is keygate's database wire-protocol broker, PostgreSQL
// first (DESIGN.md §1, docs/postgres.md). An application connects to a
// local listener with no password; the broker attests it, asks the rules
// about the database and user it asked for, fetches or mints the
// credential of the databases entry, authenticates to the real server
// itself, and then steps aside: from the first ReadyForQuery on, bytes are
// copied both ways without being parsed.
//
// The wire protocol is github.com/jackc/pgx/v5/pgproto3; SCRAM is
// github.com/xdg-go/scram. Nothing here hand-parses a message pgproto3
// decodes.
//
// Security contract:
//
//   - Nothing goes upstream before the decision. The client's startup is
//     read, the caller attested and the rule decided (request.protocol
//     "postgres", host and port of the upstream, request.database and
//     request.user as the client sent them) before any upstream connection
//     is opened or any credential fetched. A deny is an ErrorResponse with
//     SQLSTATE 28000 naming the rule; a broker-side failure (credential,
//     upstream) is 08006. Neither message ever holds a credential value or
//     the credential's username.
//   - The client picks nothing that matters. The upstream startup is built,
//     not forwarded: user is the credential's username, database is the one
//     the rule saw (the client's user name when it sent none, as PostgreSQL
//     does), options is dropped unless the entry sets allow_options, a
//     replication connection is refused unless it sets allow_replication,
//     any parameter named password (in any case) and every _pq_. protocol
//     option are dropped. The client is never asked for a password; one it
//     sends anyway is never forwarded.
//   - TLS downgrades fail closed. Bytes that arrive after an SSLRequest or
//     GSSENCRequest in the same read (CVE-2021-23214) close the connection;
//     so do bytes pipelined behind the StartupMessage. GSSENCRequest is
//     answered 'N'. Upstream, tls: require and verify-full refuse a server
//     that answers 'N', read the server's one-byte answer unbuffered (bytes
//     a man in the middle stuffs after it fail the handshake,
//     CVE-2021-23222), and verify-full checks the chain and the name before
//     anything else is sent. A cleartext password is sent only over
//     verify-full TLS. SCRAM uses SCRAM-SHA-256-PLUS (tls-server-end-point)
//     whenever the upstream leg is TLS and the server offers it, and
//     otherwise tells the server it could have bound the channel ("y"), so a
//     stripped PLUS is detected; the server's final signature must verify
//     before its AuthenticationOk is believed.
//   - Upstream errors are not relayed. An error before the session is ready
//     reaches the client as its SQLSTATE and a broker-written message; the
//     server's text (which may name the credential's role) is not copied.
//   - Cancel is scoped. The client gets a random BackendKeyData of the
//     broker's own (crypto/rand); a CancelRequest is forwarded, over a new
//     connection through the egress dialer with the session's TLS mode, only
//     when its key belongs to a live session, and only to that session's
//     server process. Any other key is dropped without an upstream
//     connection.
//   - Sessions do not outlive their credential. A session ends when the
//     credential expires (a Vault lease's TTL, an STS expiry) or the caller's
//     evidence does (an X509-SVID's NotAfter), whichever is first: the broker
//     stops reading the client, lets the server message in flight finish
//     (bounded by a grace period), sends the client FATAL 57P01
//     "terminating connection: credential lease expired", cancels the
//     server's running statement and closes both sides. A credential with
//     Release (a one-shot lease) is released when the session ends.
//   - Every upstream connection, session or cancel, goes through the one
//     egress dialer (the SSRF guard).
//   - One audit line per session, on close (broker.Record, protocol
//     "postgres", database and db_user as the client asked), with the
//     credential by name, kind and fingerprint only.
package dbproxy
