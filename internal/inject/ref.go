package inject

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/keygate/broker/internal/broker"
)

// Reference schemes accepted by ResolveRef and ValidateRef.
const (
	RefEnv  = "env:"
	RefFile = "file:"
)

// MaxRefFileSize bounds how much ResolveRef reads from a file: 1 MiB. A
// secret larger than that is a mistake (or /dev/zero), not a credential.
const MaxRefFileSize = 1 << 20

// ErrBadRef is wrapped by every error about the syntax of a reference.
var ErrBadRef = errors.New("invalid secret reference")

// ValidateRef checks the syntax of a secret reference without reading
// anything: "env:NAME" with NAME a portable environment variable name
// ([A-Za-z_][A-Za-z0-9_]*), or "file:PATH" with a non-empty PATH. It does
// no I/O, so `broker validate` can run where the secrets do not exist.
//
// A malformed reference is never echoed in the error: a literal secret
// pasted where a reference belongs must not reach a log.
func ValidateRef(ref string) error {
	switch {
	case strings.HasPrefix(ref, RefEnv):
		if !validEnvName(ref[len(RefEnv):]) {
			return fmt.Errorf("inject: env reference needs a variable name of letters, digits and '_': %w", ErrBadRef)
		}
		return nil
	case strings.HasPrefix(ref, RefFile):
		p := ref[len(RefFile):]
		if p == "" {
			return fmt.Errorf("inject: file reference needs a path: %w", ErrBadRef)
		}
		if strings.IndexByte(p, 0) >= 0 {
			return fmt.Errorf("inject: file reference path contains NUL: %w", ErrBadRef)
		}
		return nil
	}
	return fmt.Errorf("inject: secret must be given as env:NAME or file:PATH (value not shown): %w", ErrBadRef)
}

// ResolveRef reads the secret a reference names.
//
//   - "env:NAME": the variable must be set and non-empty. The value is used
//     as is.
//   - "file:PATH": the file is read (at most MaxRefFileSize bytes) and
//     exactly ONE trailing "\n" or "\r\n" is stripped, because editors and
//     `echo` add one and Kubernetes secret files often carry one. Anything
//     else is kept byte for byte, so a value ending in two newlines still
//     ends in one and is rejected when it is injected (CheckValue). The
//     result must be non-empty.
//
// ResolveRef does not reject control characters: some sources need
// multi-line secrets (a PEM private key). Injectors validate every value
// they write. Errors name the variable or path, never the value.
func ResolveRef(ref string) (broker.Secret, error) {
	if err := ValidateRef(ref); err != nil {
		return broker.Secret{}, err
	}
	if name, ok := strings.CutPrefix(ref, RefEnv); ok {
		v, set := os.LookupEnv(name)
		if !set {
			return broker.Secret{}, fmt.Errorf("inject: env:%s: environment variable is not set", name)
		}
		if v == "" {
			return broker.Secret{}, fmt.Errorf("inject: env:%s: environment variable is empty", name)
		}
		return broker.NewSecret(v), nil
	}
	path := strings.TrimPrefix(ref, RefFile)
	v, err := readLimited(path)
	if err != nil {
		return broker.Secret{}, err
	}
	v = stripOneNewline(v)
	if v == "" {
		return broker.Secret{}, fmt.Errorf("inject: file:%s: file is empty", path)
	}
	return broker.NewSecret(v), nil
}

func readLimited(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		// *PathError names the path and the cause, never content.
		return "", fmt.Errorf("inject: file:%s: %w", path, unwrapPath(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxRefFileSize+1))
	if err != nil {
		return "", fmt.Errorf("inject: file:%s: %w", path, unwrapPath(err))
	}
	if len(b) > MaxRefFileSize {
		return "", fmt.Errorf("inject: file:%s: larger than %d bytes", path, MaxRefFileSize)
	}
	return string(b), nil
}

// unwrapPath drops the *PathError wrapper so the path is not printed twice;
// errors.Is still works on the cause (fs.ErrNotExist, ...).
func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func stripOneNewline(v string) string {
	if s, ok := strings.CutSuffix(v, "\r\n"); ok {
		return s
	}
	if s, ok := strings.CutSuffix(v, "\n"); ok {
		return s
	}
	return v
}

func validEnvName(n string) bool {
	if n == "" {
		return false
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		switch {
		case c == '_', c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
