package inject

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// vault_kv against a real Vault: KV v2 (secret/, dev mode's default) and
// KV v1 (kv1/, mounted here).
func TestVaultKV(t *testing.T) {
	l := newVaultLab(t)
	apiKey, user, pass, old := canary(t), canary(t), canary(t), canary(t)
	l.put(t, "app/key", map[string]any{"api_key": old})
	l.put(t, "app/key", map[string]any{"api_key": apiKey, "username": user, "password": pass, "port": 5432, "nested": map[string]any{"x": "y"}, "empty": ""})
	l.Must("POST", "sys/mounts/kv1", map[string]any{"type": "kv", "options": map[string]any{"version": "1"}})
	l.Must("POST", "kv1/app/key", map[string]any{"api_key": apiKey, "username": user, "password": pass})
	canaries := []string{apiKey, user, pass, old}
	v, vc := l.rootConn(t)

	type want struct {
		fields map[string]string
		meta   map[string]string
		reads  int    // GETs of the secret's path
		path   string // the path read
		lookup int    // mount lookups (0 when kv_version is set or known)
	}
	cases := []struct {
		name string
		o    VaultKVOptions
		want want
	}{
		{"v2 one field", VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"},
			want{fields: map[string]string{"token": apiKey}, meta: map[string]string{"vault_path": "secret/data/app/key", "kv_version": "2", "vault_version": "2"}, reads: 1, path: "secret/data/app/key", lookup: 1}},
		{"v2 two fields from one read", VaultKVOptions{Path: "secret/data/app/key", Fields: map[string]string{"username": "username", "password": "password"}},
			want{fields: map[string]string{"username": user, "password": pass}, reads: 1, path: "secret/data/app/key"}},
		{"v2 path without data/", VaultKVOptions{Path: "secret/app/key", Field: "api_key"},
			want{fields: map[string]string{"token": apiKey}, meta: map[string]string{"vault_path": "secret/data/app/key"}, reads: 1, path: "secret/data/app/key"}},
		{"v2 every scalar key", VaultKVOptions{Path: "secret/data/app/key"},
			want{fields: map[string]string{"api_key": apiKey, "username": user, "password": pass, "port": "5432"}, reads: 1, path: "secret/data/app/key"}},
		{"v2 version pin", VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", Version: 1},
			want{fields: map[string]string{"token": old}, meta: map[string]string{"vault_version": "1"}, reads: 1, path: "secret/data/app/key"}},
		{"v2 kv_version set: no lookup", VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", KVVersion: 2},
			want{fields: map[string]string{"token": apiKey}, reads: 1, path: "secret/data/app/key"}},
		{"v1 detected", VaultKVOptions{Path: "kv1/app/key", Fields: map[string]string{"username": "username", "password": "password"}},
			want{fields: map[string]string{"username": user, "password": pass}, meta: map[string]string{"vault_path": "kv1/app/key", "kv_version": "1"}, reads: 1, path: "kv1/app/key", lookup: 1}},
		{"v1 kv_version set", VaultKVOptions{Path: "kv1/app/key", Field: "api_key", KVVersion: 1},
			want{fields: map[string]string{"token": apiKey}, reads: 1, path: "kv1/app/key"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vc.reset()
			cr, err := kvSource(t, v, tc.o).Credential(context.Background(), vaultCaller, broker.Grant{})
			if err != nil {
				t.Fatalf("Credential: %v", err)
			}
			if cr.Kind != KindVaultKV || cr.Name != "api-key" {
				t.Fatalf("kind %q name %q", cr.Kind, cr.Name)
			}
			if len(cr.Fields) != len(tc.want.fields) {
				t.Fatalf("fields %v, want %d", cr.Fields, len(tc.want.fields))
			}
			for f, val := range tc.want.fields {
				if got, _ := cr.Field(f); got.Reveal() != val {
					t.Fatalf("field %s: wrong value", f)
				}
			}
			for k, val := range tc.want.meta {
				if cr.Meta[k] != val {
					t.Fatalf("meta %s = %q, want %q", k, cr.Meta[k], val)
				}
			}
			for _, m := range cr.Meta {
				for _, c := range canaries {
					if strings.Contains(m, c) {
						t.Fatal("a secret in Meta")
					}
				}
			}
			if n := vc.count("GET /v1/" + tc.want.path); n != tc.want.reads {
				t.Fatalf("%d reads of %s, want %d", n, tc.want.path, tc.want.reads)
			}
			if n := vc.count("GET /v1/sys/internal/ui/mounts/"); n != tc.want.lookup {
				t.Fatalf("%d mount lookups, want %d", n, tc.want.lookup)
			}
			if !cr.Expires.IsZero() || cr.Release != nil {
				t.Fatal("a KV credential has an expiry or a Release")
			}
		})
	}

	errCases := []struct {
		name    string
		o       VaultKVOptions
		code    string
		mention []string
	}{
		{"missing path", VaultKVOptions{Path: "secret/data/app/nope", Field: "api_key"}, broker.CodeCredentialUnavailable, []string{"secret/data/app/nope"}},
		{"missing v1 path", VaultKVOptions{Path: "kv1/app/nope", Field: "api_key"}, broker.CodeCredentialUnavailable, []string{"kv1/app/nope"}},
		{"missing field", VaultKVOptions{Path: "secret/data/app/key", Fields: map[string]string{"password": "passwd"}}, broker.CodeCredentialMalformed, []string{"secret/data/app/key", `"password"`, `"passwd"`}},
		{"missing version", VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", Version: 9}, broker.CodeCredentialUnavailable, []string{"version 9"}},
		{"not a string", VaultKVOptions{Path: "secret/data/app/key", Field: "nested"}, broker.CodeCredentialMalformed, []string{`"nested"`}},
		{"empty value", VaultKVOptions{Path: "secret/data/app/key", Field: "empty"}, broker.CodeCredentialMalformed, []string{"empty"}},
		{"version pin on v1", VaultKVOptions{Path: "kv1/app/key", Field: "api_key", Version: 1}, broker.CodeCredentialUnavailable, []string{"v2"}},
		{"not a KV mount", VaultKVOptions{Path: "sys/mounts", Field: "x"}, broker.CodeCredentialUnavailable, []string{"sys/mounts"}},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := kvSource(t, v, tc.o).Credential(context.Background(), vaultCaller, broker.Grant{})
			be := vaultErrCode(t, err, tc.code)
			for _, m := range tc.mention {
				if !strings.Contains(be.Message, m) {
					t.Fatalf("message %q does not name %s", be.Message, m)
				}
			}
			for _, c := range canaries {
				assertNoCanary(t, c, err)
			}
			assertNoCanary(t, l.RootToken, err)
			t.Logf("%s", be.Message)
		})
	}
}

// Path templates: good claims select the caller's secret; hostile ones are
// refused before any Vault call, naming the variable and not the value.
func TestVaultKVPathTemplate(t *testing.T) {
	l := newVaultLab(t)
	blue, admin := canary(t), canary(t)
	l.put(t, "teams/blue", map[string]any{"api_key": blue})
	l.put(t, "teams/build-farm", map[string]any{"api_key": blue})
	l.put(t, "admin", map[string]any{"api_key": admin})
	l.put(t, "teams/admin", map[string]any{"api_key": admin})
	v, vc := l.rootConn(t)

	withClaim := func(team any) broker.Identity {
		id := vaultCaller
		id.Claims = map[string]any{"team": team}
		return id
	}
	src := kvSource(t, v, VaultKVOptions{Path: "secret/data/teams/{{workload.claims.team}}", Field: "api_key"})
	cr, err := src.Credential(context.Background(), withClaim("blue"), broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := cr.Field(broker.FieldToken); got.Reveal() != blue || cr.Meta["vault_path"] != "secret/data/teams/blue" {
		t.Fatalf("read %q", cr.Meta["vault_path"])
	}

	hostile := map[string]any{
		"dotdot":        "..",
		"dot":           ".",
		"dotdot inside": "a..b",
		"slash":         "a/b",
		"walk":          "../admin",
		"encoded slash": "%2f",
		"encoded walk":  "..%2fadmin",
		"backslash":     `a\b`,
		"empty":         "",
		"NUL":           "a\x00b",
		"newline":       "blue\n",
		"DEL":           "a\x7fb",
		"space":         "a b",
		"query":         "blue?version=1",
		"unicode":       "blué",
		"too long":      strings.Repeat("a", 257),
		"object":        map[string]any{"x": "y"},
		"list":          []any{"blue"},
		"missing":       nil,
	}
	for name, val := range hostile {
		t.Run(name, func(t *testing.T) {
			vc.reset()
			id := withClaim(val)
			if val == nil {
				id.Claims = nil
			}
			_, err := src.Credential(context.Background(), id, broker.Grant{})
			be := vaultErrCode(t, err, broker.CodeDenied)
			var pe *VaultPathError
			if !errors.As(err, &pe) || pe.Var != "workload.claims.team" {
				t.Fatalf("error %v does not name the variable", err)
			}
			if s, ok := val.(string); ok && len(s) > 2 && strings.Contains(be.Error(), s) {
				t.Fatalf("the value is echoed: %s", be.Error())
			}
			if n := vc.count(""); n != 0 {
				t.Fatalf("%d Vault calls for a refused path", n)
			}
			assertNoCanary(t, admin, err)
		})
	}

	t.Run("other variables", func(t *testing.T) {
		for tmpl, id := range map[string]broker.Identity{
			"secret/data/teams/{{workload.id}}":           {ID: "build-farm", Method: broker.MethodCIDR},
			"secret/data/teams/{{ delegator.sub }}":       {ID: "x", Delegator: broker.Delegator{Sub: "blue"}},
			"secret/data/teams/{{delegator.claims.team}}": {ID: "x", Delegator: broker.Delegator{Sub: "u", Claims: map[string]any{"team": "blue"}}},
		} {
			cr, err := kvSource(t, v, VaultKVOptions{Path: tmpl, Field: "api_key"}).Credential(context.Background(), id, broker.Grant{})
			if err != nil {
				t.Fatalf("%s: %v", tmpl, err)
			}
			if got, _ := cr.Field(broker.FieldToken); got.Reveal() != blue {
				t.Fatalf("%s: wrong secret", tmpl)
			}
		}
		// A SPIFFE ID holds '/', so it never fits a path segment.
		_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/teams/{{workload.id}}", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		vaultErrCode(t, err, broker.CodeDenied)
	})
}

func TestParseVaultPath(t *testing.T) {
	good := []string{
		"secret/data/app/key",
		"database/creds/orders-ro",
		"secret/data/teams/{{workload.claims.team}}",
		"secret/data/teams/{{workload.claims.team}}-prod/{{ workload.trust_domain }}",
		"kv/{{delegator.sub}}",
		"aws/creds/role@x+y=z:1,2~3",
	}
	for _, p := range good {
		if _, err := ParseVaultPath(p); err != nil {
			t.Errorf("%q: %v", p, err)
		}
	}
	bad := []string{
		"", "/secret/x", "secret/x/", "secret//x", "secret/../sys", "secret/./x", "..",
		"secret/{{workload.claims.team", "secret/workload}}", "secret/{{}}", "secret/{{workload.name}}",
		"secret/{{workload.claims.}}", "secret/{{workload.claims.a.b}}", "{{workload.claims.mount}}/data/x",
		"secret/x?version=1", "secret/x#y", "secret/a%2fb", `secret\x`, "secret/a b", "secret/\x00",
	}
	for _, p := range bad {
		if _, err := ParseVaultPath(p); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}

// FuzzVaultPathTemplate: parsing and rendering never panic, and a
// successful render never holds a traversal or a character a substituted
// value may not bring.
func FuzzVaultPathTemplate(f *testing.F) {
	f.Add("secret/data/teams/{{workload.claims.team}}", "blue")
	f.Add("secret/data/{{workload.id}}/x", "..")
	f.Add("kv/{{delegator.sub}}{{workload.claims.team}}", "a/b")
	f.Add("secret/data/teams/{{workload.claims.team}}", "%2f")
	f.Add("secret/{{ workload.trust_domain }}", ".")
	f.Add("a/{{workload.claims.x}}.{{workload.claims.x}}", ".")
	f.Fuzz(func(t *testing.T, tmpl, val string) {
		p, err := ParseVaultPath(tmpl)
		if err != nil {
			return
		}
		claims := map[string]any{}
		for _, pt := range p.parts {
			if c, ok := strings.CutPrefix(pt.v, "workload.claims."); ok {
				claims[c] = val
			}
		}
		id := broker.Identity{ID: val, TrustDomain: val, Method: val, Claims: claims,
			Delegator: broker.Delegator{Sub: val, Claims: claims}}
		out, err := p.Render(id)
		if err != nil {
			var pe *VaultPathError
			if !errors.As(err, &pe) {
				t.Fatalf("render error of type %T", err)
			}
			if len(val) > 3 && strings.Contains(err.Error(), val) {
				t.Fatalf("error echoes the value: %v", err)
			}
			return
		}
		if !p.Static() && !PathValueAllowed(val) {
			t.Fatalf("rendered %q with a value that is not allowed", out)
		}
		for _, seg := range strings.Split(out, "/") {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("rendered %q has segment %q", out, seg)
			}
		}
		for i := 0; i < len(out); i++ {
			if !pathLiteralByte(out[i]) {
				t.Fatalf("rendered %q has byte %q", out, out[i])
			}
		}
		if strings.HasPrefix(out, "/") {
			t.Fatalf("rendered %q is absolute", out)
		}
	})
}

// Vault calls per 1000 concurrent first requests for one key: the cache's
// singleflight makes them one read (plus the one login and the one mount
// lookup the connection's first use costs).
func TestVaultKVStampede(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	v, vc := l.rootConn(t)
	src := NewCache("api-key", kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}),
		CacheOptions{TTL: 5 * time.Minute})
	const n = 1000
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			cr, err := src.Credential(context.Background(), vaultCaller, broker.Grant{Credential: "api-key", Rule: "r"})
			if err == nil {
				if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
					err = errors.New("wrong value")
				}
			}
			errs <- err
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	reads := vc.count("GET /v1/secret/data/app/key")
	t.Logf("Vault calls for %d concurrent first requests of one key: %d KV read(s), %d login(s) (token lookup), %d mount lookup(s), %d in total",
		n, reads, vc.count("GET /v1/auth/token/lookup-self"), vc.count("GET /v1/sys/internal/ui/mounts/"), vc.count(""))
	if reads != 1 {
		t.Fatalf("%d KV reads for one key, want 1", reads)
	}
	if total := vc.count(""); total != 3 {
		t.Fatalf("%d Vault calls in total, want 3 (login, mount lookup, read)", total)
	}
}

// BenchmarkVaultKVCachedHit: a cached KV credential on the hot path costs
// no Vault round trip.
func BenchmarkVaultKVCachedHit(b *testing.B) {
	l := newVaultLab(b)
	l.put(b, "app/key", map[string]any{"api_key": "bench-value", "username": "u", "password": "p"})
	v, vc := l.rootConn(b)
	src := NewCache("api-key", kvSource(b, v, VaultKVOptions{Path: "secret/data/app/key",
		Fields: map[string]string{"username": "username", "password": "password"}}), CacheOptions{TTL: time.Hour})
	g := broker.Grant{Credential: "api-key", Rule: "r"}
	if _, err := src.Credential(context.Background(), vaultCaller, g); err != nil {
		b.Fatal(err)
	}
	before := vc.count("")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := src.Credential(context.Background(), vaultCaller, g); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if extra := vc.count("") - before; extra != 0 {
		b.Fatalf("%d Vault calls on cache hits, want 0", extra)
	}
	b.ReportMetric(0, "vault-calls/op")
}
