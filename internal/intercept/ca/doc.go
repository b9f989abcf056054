// Package ca is keygate's MITM certificate authority and its leaf cache.
//
// Security contract:
//
//   - The CA key is ECDSA P-256 when keygate creates it (Init, Ephemeral).
//     Init writes ca.pem (0644) and ca-key.pem (0600) with O_EXCL, never
//     overwriting an existing file, in a directory it creates as 0700. An
//     Init CA is valid for 10 years (backdated 1 hour): it is a root the
//     operator installs in workload trust stores, and rotating it means
//     touching every workload; its blast radius is bounded instead by name
//     constraints and by the key file's permissions. An Ephemeral CA lives
//     only in memory, is valid for 1 year, and only its certificate is
//     written out (atomically replaced each start, since the key is new).
//   - With permitted domains, the CA carries critical X.509 name
//     constraints: PermittedDNSDomains, plus an exclusion of every IPv4 and
//     IPv6 address, so a constrained CA cannot vouch for any IP literal or
//     any other domain even if its key leaks.
//   - Load refuses: a key file with any group or other permission bit, not a
//     regular file, or not owned by the effective uid (checked on the opened
//     descriptor); a certificate that is not a CA or may not sign
//     certificates; a CA that is not valid now; a key that does not match the
//     certificate; encrypted, unsupported (only ECDSA P-256/384/521 and RSA
//     of 2048 bits or more) or malformed keys; and goproxy's built-in CA,
//     whose private key is published (recognised by its public key, and by
//     its subject name for older goproxy releases).
//   - Leaves: a fresh ECDSA P-256 key per leaf; NotBefore now-5m for clock
//     skew; NotAfter at most now+24h (never after the CA's NotAfter);
//     exactly one SAN, the host (a DNS name or an IP address), never a
//     wildcard; ExtKeyUsage serverAuth only; a random 128-bit serial.
//   - The cache is an LRU bounded by MaxEntries and keyed by the normalised
//     host. A leaf is served from cache only while now < NotAfter -
//     Lifetime/4, so every served leaf has at least a quarter of its life
//     left. Concurrent requests for one host mint once (singleflight).
//   - Get refuses (without minting) an empty or malformed host, an IPv6 zone,
//     and any name the CA's own name constraints do not permit, rather than
//     produce a leaf that clients would reject. Callers mint only after the
//     policy allowed the host; this package cannot check that.
//   - Errors start with "ca: ", name the file or host concerned, and never
//     contain key material.
package ca
