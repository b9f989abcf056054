package main

import (
	"fmt"
	"io"

	"github.com/keygate/broker/internal/ruletest"
)

// cmdTest runs rule unit tests (docs/rule-tests.md) against the compiled
// policy only: no secret is resolved and no backend is contacted.
func cmdTest(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("test", stderr)
	cfg := fs.String("config", "", "the config `FILE` to test instead of each test file's config: entry")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: broker test [--config FILE] TESTS.yaml [MORE.yaml...]")
		fs.PrintDefaults()
	}
	// Flags may come before or after the files.
	var files []string
	for {
		if err := fs.Parse(args); err != nil {
			return exitUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		if args[0] == "--" {
			files = append(files, args[1:]...)
			break
		}
		files = append(files, args[0])
		args = args[1:]
	}
	if len(files) == 0 {
		fmt.Fprintln(stderr, "broker test: give at least one test file")
		fs.Usage()
		return exitUsage
	}
	sum := ruletest.RunFiles(files, ruletest.Options{Config: *cfg}, stdout, stderr)
	if !sum.OK() {
		return exitInput
	}
	return exitOK
}
