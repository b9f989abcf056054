// Package attest proves who a caller is, one file per method, composed by an
// ordered Chain.
//
// Security contract:
//   - An attestor never trusts what the caller merely claims: a header naming
//     an identity is not evidence, and a source address is evidence of network
//     position only (method "cidr", which rules can and should treat as weak;
//     its identity names may not contain ':', so a source address never
//     carries a SPIFFE ID or a token subject that a rule names).
//   - The chain stops at the first attestor that applies. Evidence that is
//     present but rejected (ErrInvalidEvidence) denies; it never falls through
//     to a weaker method.
//   - An empty chain, or a chain where nothing applies, denies.
package attest
