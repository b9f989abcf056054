// Package configs holds the example configurations. The quick start is
// embedded so `broker run` works with no file at all; every file here is
// validated by the tests.
package configs

import _ "embed"

// Quickstart is quickstart.yaml.
//
//go:embed quickstart.yaml
var Quickstart []byte
