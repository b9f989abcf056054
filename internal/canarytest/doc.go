// Package canarytest is the suite-wide secret sweep (SECURITY-TESTS.md
// T-B4, "no secret in logs").
//
// Security contract: every credential a test hands the broker, and every
// secret a test backend issues, is a canary registered here (New for values
// the test makes up, Register for values a real server generated). A
// package's TestMain runs its tests through Main, which captures the test
// process's file descriptors 1 and 2 (so child processes, the runtime and
// the testing package are included) and whatever tests hand to Observe:
// responses a client was shown, error strings, audit and zap log entries,
// metrics text, subprocess output. After the tests, every captured byte is
// searched for every registered canary in every spelling an echo could
// produce (raw, query/path escaped, hex, standard and URL-safe base64 at
// each byte alignment); any hit fails the package even when every test
// passed. Canaries registered after the output that leaked them was seen
// are still found: the retained output is searched again at the end.
//
// A report names the canary's label and the source it was found in, never
// the value. Captured bytes are forwarded unchanged to the real stdout and
// stderr, so a leak is visible where it happened.
//
// The package is for tests only: it is imported by _test.go files and by
// internal/testservers (make lint enforces this).
package canarytest
