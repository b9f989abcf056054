package inject

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

func TestResolveRef(t *testing.T) {
	cn := canary(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("KEYGATE_TEST_SET", cn)
	t.Setenv("KEYGATE_TEST_EMPTY", "")
	t.Setenv("KEYGATE_TEST_NL", cn+"\n")
	os.Unsetenv("KEYGATE_TEST_UNSET")

	big := write("big", strings.Repeat("a", MaxRefFileSize+1))
	atMax := write("atmax", strings.Repeat("a", MaxRefFileSize))

	tests := []struct {
		name    string
		ref     string
		want    string
		wantErr error  // errors.Is target, when the error has one
		errHas  string // substring of the error
	}{
		{name: "env set", ref: "env:KEYGATE_TEST_SET", want: cn},
		{name: "env value kept verbatim", ref: "env:KEYGATE_TEST_NL", want: cn + "\n"},
		{name: "env unset", ref: "env:KEYGATE_TEST_UNSET", errHas: "env:KEYGATE_TEST_UNSET: environment variable is not set"},
		{name: "env empty", ref: "env:KEYGATE_TEST_EMPTY", errHas: "environment variable is empty"},
		{name: "env no name", ref: "env:", wantErr: ErrBadRef},
		{name: "env bad name", ref: "env:1ABC", wantErr: ErrBadRef},
		{name: "env name with =", ref: "env:A=B", wantErr: ErrBadRef},
		{name: "file", ref: "file:" + write("plain", cn), want: cn},
		{name: "file LF stripped once", ref: "file:" + write("lf", cn+"\n"), want: cn},
		{name: "file CRLF stripped once", ref: "file:" + write("crlf", cn+"\r\n"), want: cn},
		{name: "file two LF keeps one", ref: "file:" + write("lflf", cn+"\n\n"), want: cn + "\n"},
		{name: "file lone CR kept", ref: "file:" + write("cr", cn+"\r"), want: cn + "\r"},
		{name: "file multi-line kept", ref: "file:" + write("pem", "-----BEGIN-----\n"+cn+"\n-----END-----\n"), want: "-----BEGIN-----\n" + cn + "\n-----END-----"},
		{name: "file at size limit", ref: "file:" + atMax, want: strings.Repeat("a", MaxRefFileSize)},
		{name: "file too large", ref: "file:" + big, errHas: "larger than"},
		{name: "file missing", ref: "file:" + filepath.Join(dir, "nope"), wantErr: fs.ErrNotExist},
		{name: "file empty", ref: "file:" + write("empty", ""), errHas: "file is empty"},
		{name: "file only newline", ref: "file:" + write("onlynl", "\n"), errHas: "file is empty"},
		{name: "file is a directory", ref: "file:" + dir, errHas: "file:" + dir},
		{name: "file no path", ref: "file:", wantErr: ErrBadRef},
		{name: "literal secret", ref: cn, wantErr: ErrBadRef},
		{name: "unknown scheme", ref: "vault:secret/" + cn, wantErr: ErrBadRef},
		{name: "scheme is case-sensitive", ref: "ENV:KEYGATE_TEST_SET", wantErr: ErrBadRef},
		{name: "empty", ref: "", wantErr: ErrBadRef},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ResolveRef(tc.ref)
			if tc.wantErr == nil && tc.errHas == "" {
				if err != nil {
					t.Fatalf("ResolveRef: %v", err)
				}
				if s.Reveal() != tc.want {
					t.Fatalf("value = %q, want %q", s.Reveal(), tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("ResolveRef(%q) succeeded, want an error", tc.ref)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("error %q does not contain %q", err, tc.errHas)
			}
			if !strings.HasPrefix(err.Error(), "inject: ") {
				t.Errorf("error %q lacks the inject: prefix", err)
			}
			// The canary is the value of env vars and files, and the
			// literal text of the bad references: never in an error.
			assertNoCanary(t, cn, err)
			if !s.IsZero() {
				t.Fatal("a failed ResolveRef returned a value")
			}
		})
	}
}

func TestValidateRef(t *testing.T) {
	for _, tc := range []struct {
		ref string
		ok  bool
	}{
		{"env:HOME", true},
		{"env:_X1", true},
		{"env:NEVER_SET_ANYWHERE_12345", true}, // syntax only: not read
		{"file:/does/not/exist", true},         // syntax only: not read
		{"file:relative/path", true},
		{"env:", false},
		{"env:9X", false},
		{"env:A-B", false},
		{"file:", false},
		{"file:/a\x00b", false},
		{"hunter2", false},
		{"", false},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			err := ValidateRef(tc.ref)
			if (err == nil) != tc.ok {
				t.Fatalf("ValidateRef(%q) = %v, want ok=%v", tc.ref, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrBadRef) {
				t.Fatalf("error %v does not wrap ErrBadRef", err)
			}
		})
	}
	if err := ValidateRef("hunter2-secret"); strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("a malformed reference was echoed: %v", err)
	}
}

func TestStatic(t *testing.T) {
	in := map[string]broker.Secret{"token": broker.NewSecret("s1")}
	src := NewStatic("demo-token", in)
	in["token"] = broker.NewSecret("changed-by-caller")

	c1, err := src.Credential(context.Background(), broker.Identity{}, broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	if c1.Name != "demo-token" || c1.Kind != KindStatic || !c1.Expires.IsZero() || c1.Release != nil {
		t.Fatalf("credential = %+v", c1)
	}
	if v, _ := c1.Field("token"); v.Reveal() != "s1" {
		t.Fatalf("token = %q: NewStatic did not copy its input", v.Reveal())
	}
	c1.Fields["token"] = broker.NewSecret("changed-by-consumer")
	c2, _ := src.Credential(context.Background(), broker.Identity{}, broker.Grant{})
	if v, _ := c2.Field("token"); v.Reveal() != "s1" {
		t.Fatalf("token = %q: a consumer changed the source", v.Reveal())
	}
}
