package harden

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Apply sets RLIMIT_CORE to 0 and marks the process not dumpable.
func Apply() (Status, error) {
	var st Status
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return st, fmt.Errorf("harden: RLIMIT_CORE: %w", err)
	}
	st.CoreLimitZero = true
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return st, fmt.Errorf("harden: PR_SET_DUMPABLE: %w", err)
	}
	st.NotDumpable = true
	return st, nil
}

// Current reads the process's state back from the kernel.
func Current() (Status, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_CORE, &lim); err != nil {
		return Status{}, fmt.Errorf("harden: RLIMIT_CORE: %w", err)
	}
	d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		return Status{}, fmt.Errorf("harden: PR_GET_DUMPABLE: %w", err)
	}
	return Status{CoreLimitZero: lim.Cur == 0 && lim.Max == 0, NotDumpable: d == 0}, nil
}
