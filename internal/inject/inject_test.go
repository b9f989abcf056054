package inject

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

// canary returns a unique marker to put inside secret values; no error or
// printed form may ever contain it. It is registered for the suite-wide
// sweep (canarytest).
func canary(t testing.TB) string {
	t.Helper()
	return canarytest.New("inject (" + t.Name() + ")")
}

// assertNoCanary fails if any printed form of v contains c; every printed
// form is also handed to the suite-wide sweep. Messages name the verb, not
// the text: the text holds the secret.
func assertNoCanary(t *testing.T, c string, vs ...any) {
	t.Helper()
	for i, v := range vs {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
			s := fmt.Sprintf(verb, v)
			canarytest.ObserveString("inject printed value ("+t.Name()+")", s)
			if strings.Contains(s, c) {
				t.Fatalf("secret canary leaked through %s of value #%d (%T)", verb, i, v)
			}
		}
		if err, ok := v.(error); ok && strings.Contains(err.Error(), c) {
			t.Fatalf("secret canary leaked through Error() of value #%d (%T)", i, v)
		}
	}
}

func cred(fields map[string]string) broker.Credential {
	f := make(map[string]broker.Secret, len(fields))
	for k, v := range fields {
		f[k] = broker.NewSecret(v)
	}
	return broker.Credential{Name: "test-cred", Kind: KindStatic, Fields: f}
}

func mustHeader(t testing.TB, name, format string) broker.Injector {
	t.Helper()
	h, err := Header(name, format)
	if err != nil {
		t.Fatalf("Header(%q, %q): %v", name, format, err)
	}
	return h
}

func newReq(t testing.TB, rawURL string) *http.Request {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, rawURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// variantKeys returns every key of h equal to name in any case.
func variantKeys(h http.Header, name string) []string {
	var ks []string
	for k := range h {
		if strings.EqualFold(k, name) {
			ks = append(ks, k)
		}
	}
	slices.Sort(ks)
	return ks
}

// wireRoundTrip serialises r as it would go to the upstream, counts the
// header lines named name (any case) and parses the bytes back.
func wireRoundTrip(t *testing.T, r *http.Request, name string) (lines int, parsed *http.Request) {
	t.Helper()
	var buf bytes.Buffer
	if err := r.Write(&buf); err != nil {
		t.Fatalf("r.Write: %v", err)
	}
	head, _, _ := strings.Cut(buf.String(), "\r\n\r\n")
	for _, l := range strings.Split(head, "\r\n")[1:] {
		k, _, _ := strings.Cut(l, ":")
		if strings.EqualFold(k, name) {
			lines++
		}
	}
	parsed, err := http.ReadRequest(bufio.NewReader(&buf))
	if err != nil {
		t.Fatalf("http.ReadRequest of the serialised request: %v", err)
	}
	return lines, parsed
}

// caseVariants gives the spellings a workload (or goproxy with
// PreventCanonicalization) may leave in the header map.
func caseVariants(name string) []string {
	mixed := []byte(strings.ToLower(name))
	for i := 0; i < len(mixed); i += 2 {
		if mixed[i] >= 'a' && mixed[i] <= 'z' {
			mixed[i] -= 'a' - 'A'
		}
	}
	return []string{strings.ToLower(name), strings.ToUpper(name), string(mixed)}
}

// T-B1.
func TestInjectionReplacesAllVariants(t *testing.T) {
	const tok = "broker-token-1"
	basicWant := "Basic " + base64.StdEncoding.EncodeToString([]byte("svc:pw"))
	c := cred(map[string]string{"token": tok, "username": "svc", "password": "pw"})

	injectors := []struct {
		name  string
		inj   broker.Injector
		owned string
		want  string
	}{
		{"bearer", Bearer(), "Authorization", "Bearer " + tok},
		{"basic", Basic(), "Authorization", basicWant},
		{"header X-Api-Key", mustHeader(t, "X-Api-Key", ""), "X-Api-Key", tok},
		{"header lower-case name", mustHeader(t, "x-api-key", "{{token}}"), "X-Api-Key", tok},
		{"header Authorization with format", mustHeader(t, "Authorization", "token {{ token }}"), "Authorization", "token " + tok},
	}

	type hv struct{ key, val string }
	workloads := []struct {
		name string
		hdrs func(owned string) []hv
	}{
		{"none", func(string) []hv { return nil }},
		{"lower case", func(o string) []hv { return []hv{{strings.ToLower(o), "workload-lower"}} }},
		{"upper case", func(o string) []hv { return []hv{{strings.ToUpper(o), "workload-upper"}} }},
		{"two canonical values", func(o string) []hv { return []hv{{o, "workload-1"}, {o, "workload-2"}} }},
		{"every variant, repeated", func(o string) []hv {
			var out []hv
			for i, k := range append(caseVariants(o), o) {
				out = append(out, hv{k, fmt.Sprintf("workload-%d-a", i)}, hv{k, fmt.Sprintf("workload-%d-b", i)})
			}
			return out
		}},
		{"empty value", func(o string) []hv { return []hv{{o, ""}} }},
	}

	// Unowned headers, including Proxy-Authorization (stripped by
	// intercept, not by an injector), must be left exactly as they were.
	unowned := []hv{{"Proxy-Authorization", "Basic d29ya2xvYWQ="}, {"X-Other", "keep"}, {"Cookie", "a=b"}}

	modes := []struct {
		name string
		set  func(h http.Header, k, v string)
	}{
		// net/http and goproxy by default: keys canonicalised on the way in.
		{"canonicalising", func(h http.Header, k, v string) { h.Add(k, v) }},
		// goproxy PreventCanonicalization: keys stored exactly as sent.
		{"PreventCanonicalization", func(h http.Header, k, v string) { h[k] = append(h[k], v) }},
	}

	for _, m := range modes {
		for _, in := range injectors {
			for _, w := range workloads {
				t.Run(m.name+"/"+in.name+"/"+w.name, func(t *testing.T) {
					r := newReq(t, "https://api.example.com/v1/things?x=1")
					for _, h := range w.hdrs(in.owned) {
						m.set(r.Header, h.key, h.val)
					}
					for _, h := range unowned {
						m.set(r.Header, h.key, h.val)
					}
					if err := in.inj.Inject(r, c); err != nil {
						t.Fatalf("Inject: %v", err)
					}
					if ks := variantKeys(r.Header, in.owned); len(ks) != 1 || ks[0] != in.owned {
						t.Fatalf("keys for %s after injection = %q, want exactly [%q]", in.owned, ks, in.owned)
					}
					if got := r.Header[in.owned]; len(got) != 1 || got[0] != in.want {
						t.Fatalf("%s = %q, want exactly [%q]", in.owned, got, in.want)
					}
					for _, h := range unowned {
						if got := r.Header[http.CanonicalHeaderKey(h.key)]; len(got) != 1 || got[0] != h.val {
							t.Errorf("unowned header %s = %q, want it untouched (%q)", h.key, got, h.val)
						}
					}

					lines, parsed := wireRoundTrip(t, r, in.owned)
					if lines != 1 {
						t.Fatalf("%d %s lines on the wire, want 1", lines, in.owned)
					}
					if got := parsed.Header.Values(in.owned); len(got) != 1 || got[0] != in.want {
						t.Fatalf("upstream parsed %s = %q, want exactly [%q]", in.owned, got, in.want)
					}
				})
			}
		}
	}
}

// Query parameter names are case-sensitive; only the exact name is owned.
func TestQueryInjectionReplacesAllOccurrences(t *testing.T) {
	const tok = "q-tok/+="
	enc := url.QueryEscape(tok)
	inj, err := Query("api_key")
	if err != nil {
		t.Fatal(err)
	}
	c := cred(map[string]string{"token": tok})
	tests := []struct {
		name     string
		rawQuery string
		want     string // RawQuery after injection
		kept     url.Values
	}{
		{"no query", "", "api_key=" + enc, nil},
		{"repeated and upper-case", "api_key=a&api_key=b&API_KEY=c", "API_KEY=c&api_key=" + enc, url.Values{"API_KEY": {"c"}}},
		{"percent-encoded name", "x=1&api%5Fkey=d&y=2", "x=1&y=2&api_key=" + enc, url.Values{"x": {"1"}, "y": {"2"}}},
		{"semicolon-smuggled", "x=1;api_key=e&y=2", "y=2&api_key=" + enc, url.Values{"y": {"2"}}},
		{"bare name and empty value", "api_key&z=3&api_key=", "z=3&api_key=" + enc, url.Values{"z": {"3"}}},
		{"order and encoding of others kept", "b=2&a=%41&api_key=x&c", "b=2&a=%41&c&api_key=" + enc, url.Values{"a": {"A"}, "b": {"2"}, "c": {""}}},
		{"lookalike names kept", "api_keys=1&xapi_key=2&api_key_=3", "api_keys=1&xapi_key=2&api_key_=3&api_key=" + enc,
			url.Values{"api_keys": {"1"}, "xapi_key": {"2"}, "api_key_": {"3"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newReq(t, "https://api.example.com/v1")
			r.URL.RawQuery = tc.rawQuery
			if err := inj.Inject(r, c); err != nil {
				t.Fatalf("Inject: %v", err)
			}
			if r.URL.RawQuery != tc.want {
				t.Fatalf("RawQuery = %q, want %q", r.URL.RawQuery, tc.want)
			}
			_, parsed := wireRoundTrip(t, r, "Authorization")
			q, err := url.ParseQuery(parsed.URL.RawQuery)
			if err != nil {
				t.Fatalf("upstream cannot parse query %q: %v", parsed.URL.RawQuery, err)
			}
			if got := q["api_key"]; len(got) != 1 || got[0] != tok {
				t.Fatalf("upstream api_key = %q, want exactly [%q]", got, tok)
			}
			delete(q, "api_key")
			if len(q) != len(tc.kept) {
				t.Fatalf("other params = %v, want %v", q, tc.kept)
			}
			for k, v := range tc.kept {
				if !slices.Equal(q[k], v) {
					t.Errorf("param %s = %q, want %q", k, q[k], v)
				}
			}
		})
	}
}

// T-B6: malformed credential values are refused before anything is
// written, and never appear in the error.
func TestCredentialValidation(t *testing.T) {
	cn := canary(t)
	dir := t.TempDir()
	fileRef := func(t *testing.T, content string) broker.Secret {
		t.Helper()
		p := filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_"))
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := ResolveRef("file:" + p)
		if err != nil {
			t.Fatalf("ResolveRef: %v", err)
		}
		return s
	}
	direct := func(v string) func(*testing.T) broker.Secret {
		return func(*testing.T) broker.Secret { return broker.NewSecret(v) }
	}
	viaFile := func(content string) func(*testing.T) broker.Secret {
		return func(t *testing.T) broker.Secret { return fileRef(t, content) }
	}

	// Header(X-Api-Key) with the default format writes the token as is, so
	// lengths are exact.
	maxTok := cn + strings.Repeat("x", MaxValueLen-len(cn))
	tests := []struct {
		name    string
		secret  func(*testing.T) broker.Secret
		inj     broker.Injector
		slot    string
		want    string // header value on success
		wantErr error
	}{
		{"file: one trailing LF stripped", viaFile(cn + "\n"), Bearer(), "Authorization", "Bearer " + cn, nil},
		{"file: one trailing CRLF stripped", viaFile(cn + "\r\n"), Bearer(), "Authorization", "Bearer " + cn, nil},
		{"file: no newline", viaFile(cn), Bearer(), "Authorization", "Bearer " + cn, nil},
		{"file: two LF, one remains", viaFile(cn + "\n\n"), Bearer(), "Authorization", "", ErrControlChars},
		{"file: two CRLF, one remains", viaFile(cn + "\r\n\r\n"), Bearer(), "Authorization", "", ErrControlChars},
		{"file: LF then CRLF", viaFile(cn + "\n\r\n"), Bearer(), "Authorization", "", ErrControlChars},
		{"file: leading LF kept", viaFile("\n" + cn + "\n"), Bearer(), "Authorization", "", ErrControlChars},
		{"trailing LF", direct(cn + "\n"), Bearer(), "Authorization", "", ErrControlChars},
		{"CR inside", direct(cn + "\rx"), Bearer(), "Authorization", "", ErrControlChars},
		{"LF inside", direct(cn + "\nx"), Bearer(), "Authorization", "", ErrControlChars},
		{"NUL", direct(cn + "\x00"), Bearer(), "Authorization", "", ErrControlChars},
		{"SOH", direct(cn + "\x01"), Bearer(), "Authorization", "", ErrControlChars},
		{"ESC", direct(cn + "\x1b[2J"), Bearer(), "Authorization", "", ErrControlChars},
		{"DEL", direct(cn + "\x7f"), Bearer(), "Authorization", "", ErrControlChars},
		{"header injection payload", direct(cn + "\r\nX-Injected: 1\r\n\r\nGET /evil HTTP/1.1"), Bearer(), "Authorization", "", ErrControlChars},
		{"header injection via header injector", direct(cn + "\r\nHost: evil"), mustHeader(t, "X-Api-Key", ""), "X-Api-Key", "", ErrControlChars},
		{"tab allowed", direct(cn + "\tx"), Bearer(), "Authorization", "Bearer " + cn + "\tx", nil},
		{"obs-text allowed", direct(cn + "é"), Bearer(), "Authorization", "Bearer " + cn + "é", nil},
		{"exactly 8 KiB", direct(maxTok), mustHeader(t, "X-Api-Key", ""), "X-Api-Key", maxTok, nil},
		{"8 KiB + 1", direct(maxTok + "x"), mustHeader(t, "X-Api-Key", ""), "X-Api-Key", "", ErrTooLong},
		{"8 KiB after Bearer prefix", direct(maxTok[:MaxValueLen-len("Bearer ")]), Bearer(), "Authorization", "Bearer " + maxTok[:MaxValueLen-len("Bearer ")], nil},
		{"over 8 KiB only after Bearer prefix", direct(maxTok[:MaxValueLen-len("Bearer ")+1]), Bearer(), "Authorization", "", ErrTooLong},
		{"over 8 KiB only after format", direct(maxTok[:MaxValueLen-2]), mustHeader(t, "X-Api-Key", "k={{token}};"), "X-Api-Key", "", ErrTooLong},
		{"empty token", direct(""), Bearer(), "Authorization", "", ErrMissingField},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sec := tc.secret(t)
			c := broker.Credential{Name: "demo", Kind: KindStatic, Fields: map[string]broker.Secret{"token": sec}}
			r := newReq(t, "https://api.example.com/")
			r.Header.Set(tc.slot, "workload-original")
			err := tc.inj.Inject(r, c)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("Inject: %v", err)
				}
				if got := r.Header.Values(tc.slot); len(got) != 1 || got[0] != tc.want {
					t.Fatalf("%s = %q, want [%q]", tc.slot, got, tc.want)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Inject error = %v, want %v", err, tc.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "inject: ") {
				t.Errorf("error %q lacks the inject: prefix", err)
			}
			assertNoCanary(t, cn, err, c, sec)
			if got := r.Header.Values(tc.slot); len(got) != 1 || got[0] != "workload-original" {
				t.Fatalf("a failed Inject changed the request: %s = %q", tc.slot, got)
			}
		})
	}
}

func TestInjectorFieldErrors(t *testing.T) {
	cn := canary(t)
	tests := []struct {
		name    string
		inj     broker.Injector
		fields  map[string]string
		wantErr error
		field   string
	}{
		{"bearer: no token", Bearer(), map[string]string{"username": cn}, ErrMissingField, "token"},
		{"basic: no username", Basic(), map[string]string{"password": cn}, ErrMissingField, "username"},
		{"basic: no password", Basic(), map[string]string{"username": "svc"}, ErrMissingField, "password"},
		{"basic: colon in username", Basic(), map[string]string{"username": "svc:" + cn, "password": "p"}, ErrColon, "username"},
		{"basic: LF in password", Basic(), map[string]string{"username": "svc", "password": cn + "\n"}, ErrControlChars, "password"},
		{"basic: NUL in username", Basic(), map[string]string{"username": cn + "\x00", "password": "p"}, ErrControlChars, "username"},
		{"header: second field missing", mustHeader(t, "X-Auth", "{{token}}:{{secret}}"), map[string]string{"token": cn}, ErrMissingField, "secret"},
		{"header: CR in second field", mustHeader(t, "X-Auth", "{{token}}:{{secret}}"), map[string]string{"token": "a", "secret": cn + "\r"}, ErrControlChars, "secret"},
		{"query: no token", mustQuery(t, "key"), map[string]string{}, ErrMissingField, "token"},
		{"query: LF in token", mustQuery(t, "key"), map[string]string{"token": cn + "\n"}, ErrControlChars, "token"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := cred(tc.fields)
			r := newReq(t, "https://api.example.com/?key=orig")
			before := r.URL.String()
			err := tc.inj.Inject(r, c)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if want := fmt.Sprintf("inject: credential %q field %q: ", c.Name, tc.field); !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q, want prefix %q", err, want)
			}
			assertNoCanary(t, cn, err, c)
			if len(r.Header) != 0 || r.URL.String() != before {
				t.Fatalf("a failed Inject changed the request: %v %s", r.Header, r.URL)
			}
		})
	}
}

func TestBasicAllowsEmptyPassword(t *testing.T) {
	r := newReq(t, "https://api.example.com/")
	if err := Basic().Inject(r, cred(map[string]string{"username": "sk_live", "password": ""})); err != nil {
		t.Fatal(err)
	}
	user, pass, ok := r.BasicAuth()
	if !ok || user != "sk_live" || pass != "" {
		t.Fatalf("BasicAuth = %q %q %v", user, pass, ok)
	}
}

func TestHeaderFormatFields(t *testing.T) {
	inj := mustHeader(t, "X-Auth", "id={{ username }}, key={{password}}; v=1")
	r := newReq(t, "https://api.example.com/")
	if err := inj.Inject(r, cred(map[string]string{"username": "u1", "password": "p1"})); err != nil {
		t.Fatal(err)
	}
	if got, want := r.Header.Get("X-Auth"), "id=u1, key=p1; v=1"; got != want {
		t.Fatalf("X-Auth = %q, want %q", got, want)
	}
}

func mustQuery(t testing.TB, name string) broker.Injector {
	t.Helper()
	q, err := Query(name)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func TestHeaderConstructor(t *testing.T) {
	tests := []struct {
		name, header, format string
		wantErr              error
	}{
		{"default format", "X-Api-Key", "", nil},
		{"lower-case name", "x-api-key", "{{token}}", nil},
		{"authorization with prefix", "Authorization", "token {{token}}", nil},
		{"cookie", "Cookie", "session={{token}}", nil},
		{"spaces in placeholder", "X-Api-Key", "{{  token }}", nil},
		{"two fields", "X-Auth", "{{username}}:{{password}}", nil},
		{"empty name", "", "", ErrBadHeaderName},
		{"space in name", "X Api", "", ErrBadHeaderName},
		{"colon in name", "X-Api:", "", ErrBadHeaderName},
		{"CRLF in name", "X-Api\r\nHost", "", ErrBadHeaderName},
		{"pseudo-header", ":authority", "", ErrBadHeaderName},
		{"Host", "Host", "", ErrBadHeaderName},
		{"host lower", "host", "", ErrBadHeaderName},
		{"Connection", "Connection", "", ErrBadHeaderName},
		{"Keep-Alive", "keep-alive", "", ErrBadHeaderName},
		{"TE", "TE", "", ErrBadHeaderName},
		{"Trailer", "Trailer", "", ErrBadHeaderName},
		{"Transfer-Encoding", "Transfer-Encoding", "", ErrBadHeaderName},
		{"Upgrade", "Upgrade", "", ErrBadHeaderName},
		{"Content-Length", "content-length", "", ErrBadHeaderName},
		{"Expect", "Expect", "", ErrBadHeaderName},
		{"Proxy-Authorization", "Proxy-Authorization", "", ErrBadHeaderName},
		{"any Proxy-", "PROXY-Whatever", "", ErrBadHeaderName},
		{"keygate internal", "X-Keygate-Identity", "", ErrBadHeaderName},
		{"broker internal", "x-broker-identity", "", ErrBadHeaderName},
		{"unterminated placeholder", "X-Api-Key", "{{token", ErrBadFormat},
		{"stray closing braces", "X-Api-Key", "token}} {{token}}", ErrBadFormat},
		{"empty placeholder", "X-Api-Key", "{{}}", ErrBadFormat},
		{"bad field name", "X-Api-Key", "{{to ken}}", ErrBadFormat},
		{"no placeholder", "X-Api-Key", "static-value", ErrBadFormat},
		{"CRLF in literal", "X-Api-Key", "a\r\nX-Evil: 1\r\n{{token}}", ErrBadFormat},
		{"NUL in literal", "X-Api-Key", "a\x00{{token}}", ErrBadFormat},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inj, err := Header(tc.header, tc.format)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("Header: %v", err)
				}
				if inj.Kind() != KindHeader {
					t.Fatalf("Kind = %q", inj.Kind())
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Header(%q, %q) error = %v, want %v", tc.header, tc.format, err, tc.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "inject: ") {
				t.Errorf("error %q lacks the inject: prefix", err)
			}
		})
	}
}

func TestQueryConstructor(t *testing.T) {
	for _, tc := range []struct {
		name, param string
		ok          bool
	}{
		{"plain", "api_key", true},
		{"needs escaping", "a b&c", true},
		{"empty", "", false},
		{"LF", "a\nb", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Query(tc.param)
			if (err == nil) != tc.ok {
				t.Fatalf("Query(%q) error = %v, want ok=%v", tc.param, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrBadQueryName) {
				t.Fatalf("error %v does not wrap ErrBadQueryName", err)
			}
		})
	}
}

func TestKinds(t *testing.T) {
	for _, tc := range []struct {
		inj  broker.Injector
		want string
	}{
		{Bearer(), "bearer"}, {Basic(), "basic"}, {mustHeader(t, "X-K", ""), "header"}, {mustQuery(t, "k"), "query"},
	} {
		if got := tc.inj.Kind(); got != tc.want {
			t.Errorf("Kind() = %q, want %q", got, tc.want)
		}
	}
}

func TestCheckValue(t *testing.T) {
	cn := canary(t)
	tests := []struct {
		name    string
		v       string
		wantErr error
	}{
		{"plain", cn, nil},
		{"empty", "", nil},
		{"tab", "a\tb", nil},
		{"space", "a b", nil},
		{"utf-8", "ключ", nil},
		{"max length", strings.Repeat("a", MaxValueLen), nil},
		{"too long", strings.Repeat("a", MaxValueLen+1), ErrTooLong},
		{"CR", cn + "\r", ErrControlChars},
		{"LF", cn + "\n", ErrControlChars},
		{"NUL", cn + "\x00", ErrControlChars},
		{"VT", cn + "\v", ErrControlChars},
		{"unit separator", cn + "\x1f", ErrControlChars},
		{"DEL", cn + "\x7f", ErrControlChars},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckValue(tc.v)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("CheckValue error = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				if !strings.HasPrefix(err.Error(), "inject: ") {
					t.Errorf("error %q lacks the inject: prefix", err)
				}
				assertNoCanary(t, cn, err)
			}
		})
	}
}

// FuzzHeaderInjection: for any header map and any injector name, injection
// never panics, and on success exactly one key of the owned name remains
// (the canonical one) with exactly one value, the broker's.
func FuzzHeaderInjection(f *testing.F) {
	f.Add("authorization: a\nAUTHORIZATION: b\nAuthorization: c\nAuthorization: d", "", "tok", uint64(0))
	f.Add("x-api-key: a\nX-API-KEY: b", "X-Api-Key", "tok", uint64(0x5555))
	f.Add("X-Api-Key: a", "x-api-key", "tok\r\nX-Evil: 1", uint64(1))
	f.Add("", "Proxy-Authorization", "tok", uint64(7))
	f.Add("host: x\n: y\n\x00: z", "Host", "", uint64(0xffff))
	f.Fuzz(func(t *testing.T, spec, name, value string, mask uint64) {
		inj := Bearer()
		owned := "Authorization"
		if name != "" {
			if h, err := Header(name, "{{token}}"); err == nil {
				inj, owned = h, name
			}
		}
		r := &http.Request{Method: http.MethodGet, URL: &url.URL{Scheme: "https", Host: "h", Path: "/"}, Header: http.Header{}}
		for _, line := range strings.Split(spec, "\n") {
			k, v, _ := strings.Cut(line, ":")
			r.Header[k] = append(r.Header[k], v) // raw, as with PreventCanonicalization
		}
		// Case variants of the owned name chosen by mask.
		b := []byte(owned)
		for i := range b {
			if mask&(1<<(i%64)) != 0 {
				switch {
				case b[i] >= 'a' && b[i] <= 'z':
					b[i] -= 'a' - 'A'
				case b[i] >= 'A' && b[i] <= 'Z':
					b[i] += 'a' - 'A'
				}
			}
		}
		r.Header[string(b)] = append(r.Header[string(b)], "variant")
		r.Header[strings.ToLower(owned)] = append(r.Header[strings.ToLower(owned)], "lower")

		err := inj.Inject(r, cred(map[string]string{"token": value}))
		valid := value != "" && checkValue(value) == nil
		if inj.Kind() == KindBearer {
			valid = valid && checkValue("Bearer "+value) == nil
		}
		if err != nil {
			if valid {
				t.Fatalf("valid value rejected: %v", err)
			}
			return
		}
		if !valid {
			t.Fatalf("invalid value %q accepted", value)
		}
		canon := http.CanonicalHeaderKey(owned)
		if ks := variantKeys(r.Header, owned); len(ks) != 1 || ks[0] != canon {
			t.Fatalf("keys for %q after injection = %q, want [%q]", owned, ks, canon)
		}
		want := value
		if inj.Kind() == KindBearer {
			want = "Bearer " + value
		}
		if got := r.Header[canon]; len(got) != 1 || got[0] != want {
			t.Fatalf("%s = %q, want [%q]", canon, got, want)
		}
	})
}

func BenchmarkBearerInject(b *testing.B) {
	c := cred(map[string]string{"token": strings.Repeat("t", 40)})
	r, _ := http.NewRequest(http.MethodGet, "https://api.example.com/v1", nil)
	r.Header.Set("Accept", "application/json")
	r.Header.Set("User-Agent", "bench")
	r.Header["authorization"] = []string{"workload"}
	inj := Bearer()
	b.ReportAllocs()
	for b.Loop() {
		if err := inj.Inject(r, c); err != nil {
			b.Fatal(err)
		}
	}
}
