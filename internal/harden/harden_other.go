//go:build !linux

package harden

// Apply does nothing on this platform.
func Apply() (Status, error) { return Status{}, nil }

// Current reports nothing applied.
func Current() (Status, error) { return Status{}, nil }
