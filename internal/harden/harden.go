// Package harden applies process-level protections for a process that holds
// credentials in memory (SECURITY-TESTS T-B11).
//
// Security contract: after Apply the process writes no core dump
// (RLIMIT_CORE is 0, soft and hard) and is not dumpable (PR_SET_DUMPABLE 0:
// no core file, and other processes of the same uid can neither ptrace it
// nor read its /proc/PID/mem). Apply is a hardening step: it does not
// claim that secrets are erased from memory. On platforms without these
// controls Apply does nothing and says so.
package harden

// Status reports what Apply achieved, for the startup log.
type Status struct {
	CoreLimitZero bool
	NotDumpable   bool
}
