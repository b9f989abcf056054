// Package deploy holds keygate's deployment artefacts and their tests: the
// redirect script keygate-iptables (this directory), the Kubernetes manifests
// (kubernetes/, a nested Go module with its own tests) and, one level up, the
// Dockerfile. The package has no Go code of its own; iptables_test.go runs
// the script in throwaway network namespaces.
//
// # Security contract of keygate-iptables
//
// What it installs, in the network namespace it runs in (a pod's, via an
// init container with CAP_NET_ADMIN):
//
//   - A REDIRECT of new outbound TCP connections (the nat OUTPUT hook: only
//     connections originated in this namespace; inbound, forwarded and UDP
//     traffic are untouched) whose destination port is in --ports (default
//     80,443; every port with --all-ports) to the broker's transparent port
//     (--to-port, default 15001). For locally generated traffic REDIRECT
//     rewrites the destination to 127.0.0.1 (IPv4) or ::1 (IPv6), so the
//     broker must listen on loopback (or a wildcard address) in that same
//     namespace; the source address and port are unchanged, and the original
//     destination is recoverable with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
//   - Exemptions, checked before the redirect: the exempt uids (--exempt-uid,
//     default 65532, the broker image's uid; a uid is matched on the socket's
//     owner, which the process cannot change after creating the socket),
//     every destination routed through lo (127.0.0.0/8, ::1 and the
//     namespace's own addresses), the exempt destination prefixes
//     (--exempt-cidr) and the exempt destination ports (--exempt-port).
//     Exemptions win over --ports.
//   - IPv4 and IPv6 alike, unless --ipv4-only or --ipv6-only. With one family
//     switched off, that family's egress is not redirected at all: it
//     bypasses the broker unless something else blocks it (the script warns).
//
// What it guarantees:
//
//   - Every value is validated before anything is touched; an invalid value,
//     a missing tool or a failed kernel call exits non-zero with a message on
//     stderr. A pod whose init container fails does not start, so a failure
//     never leaves an application running uncaptured.
//   - Idempotent and atomic per family: nft replaces "table inet keygate" in
//     one transaction; iptables replaces the contents of the KEYGATE_OUTPUT
//     chain and ensures exactly one jump to it at the top of nat OUTPUT in one
//     iptables-restore transaction per family. Running it twice leaves one
//     set of rules; running it with new settings replaces the old ones.
//   - --remove deletes exactly those named objects and nothing else (with
//     iptables-nft, the nat table's empty built-in chains, created on first
//     use by any iptables command, remain). --dry-run prints the nft script or
//     the iptables-restore input it would apply and changes nothing; it needs
//     no privileges.
//
// What it does not do:
//
//   - It is not a firewall: an application that is root in the namespace (or
//     holds CAP_NET_ADMIN), or that runs as an exempt uid, can bypass or
//     remove the redirect. The application must run as a uid that is not
//     exempt, without those capabilities; a NetworkPolicy that blocks the
//     pod's direct egress is the second layer.
//   - It does not redirect UDP (DNS keeps working; QUIC/HTTP3 is not
//     captured and should be blocked by policy) nor connections through an
//     exempt destination (those leave directly).
//   - The broker must never dial through the redirect itself: it must run as
//     an exempt uid. The broker also detects a connection redirected back to
//     its own transparent listener (loop detection) as a second guard.
//
// Capabilities: the nft and iptables-nft backends need CAP_NET_ADMIN only;
// iptables-legacy also needs CAP_NET_RAW and a writable /run (its lock file)
// or $XTABLES_LOCKFILE. iptables_test.go proves each of these.
package deploy
