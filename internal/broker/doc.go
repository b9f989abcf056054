// Package broker is the vocabulary of keygate and its request pipeline.
//
// It defines who is calling (Identity), where they are going (Target), what the
// policy said (Decision), what was fetched for them (Credential, whose values
// are Secret), and the small interfaces every other package implements:
// Attestor, Policy, Source, Injector, Dialer and Clock. Pipeline composes them
// for one CONNECT or one request without knowing how bytes reach it.
//
// Security contract:
//   - Zero values deny. The zero Decision is a deny, the zero Identity is
//     unauthenticated, and a nil Injector or Source never forwards a request.
//   - Every failure is an *Error carrying the status the workload sees
//     (DESIGN.md §7); its message never contains a credential value.
//   - A Secret prints, formats, marshals and logs as REDACTED. The only way to
//     read it is Reveal, which injectors call at the last moment.
//   - A credential is injected only into a request the Decision allowed, and
//     only over TLS unless the rule explicitly allows plaintext.
//
// This package imports only the standard library and zap.
package broker
