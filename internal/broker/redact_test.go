package broker

import (
	"encoding/base64"
	"net/url"
	"strings"
	"testing"
)

func TestEncodedForms(t *testing.T) {
	c := Credential{Fields: map[string]Secret{
		FieldUsername: NewSecret("api"),
		FieldPassword: NewSecret("key-1234"),
	}}
	forms := map[string]bool{}
	for _, f := range c.EncodedForms() {
		forms[f] = true
	}
	basic := base64.StdEncoding.EncodeToString([]byte("api:key-1234"))
	for _, want := range []string{"key-1234", strings.TrimRight(basic, "=")} {
		if !forms[want] {
			t.Errorf("missing form %q", want)
		}
	}
	if forms["api"] {
		t.Error("a user name next to a password is listed on its own")
	}
	c.Fields[FieldPassword] = NewSecret("")
	found := false
	for _, f := range c.EncodedForms() {
		found = found || f == "api"
	}
	if !found {
		t.Error("a user name used as the key (empty password) is not listed")
	}
}

func TestRedact(t *testing.T) {
	const tok = "CANARY/tok+en=7f"
	c := Credential{Fields: map[string]Secret{FieldToken: NewSecret(tok), "short": NewSecret("ab")}}
	tests := []struct{ name, in string }{
		{"raw", "error: Bearer " + tok + " refused"},
		{"query-escaped", "GET /x?key=" + url.QueryEscape(tok)},
		{"path-escaped", "GET /" + url.PathEscape(tok)},
		{"padded base64", "basic " + base64.StdEncoding.EncodeToString([]byte(tok))},
		{"url base64", base64.URLEncoding.EncodeToString([]byte(tok))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := c.Redact(tc.in)
			if strings.Contains(out, "CANARY") || strings.Contains(out, strings.TrimRight(base64.StdEncoding.EncodeToString([]byte(tok)), "=")) || !strings.Contains(out, "REDACTED") {
				t.Fatalf("Redact(%q) = %q", tc.in, out)
			}
		})
	}
	pair := Credential{Fields: map[string]Secret{FieldUsername: NewSecret("v-app-ro-x1y2"), FieldPassword: NewSecret("pw-secret-9")}}
	if out := pair.Redact(`role "v-app-ro-x1y2" refused`); strings.Contains(out, "v-app-ro-x1y2") {
		t.Fatalf("the username survived log redaction: %q", out)
	}
	if out := c.Redact("about a cab"); out != "about a cab" {
		t.Fatalf("a value shorter than 4 bytes mangled the text: %q", out)
	}
	if out := (Credential{}).Redact("x", NewSecret("derived-token")); out != "x" {
		t.Fatal(out)
	}
	if out := (Credential{}).Redact("has derived-token", NewSecret("derived-token")); strings.Contains(out, "derived-token") {
		t.Fatalf("extra value not redacted: %q", out)
	}
}
