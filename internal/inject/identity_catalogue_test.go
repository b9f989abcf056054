package inject

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
)

// TestCredentialBoundToIdentity (SECURITY-TESTS T-B7, release gate 12):
// the credential a request carries is chosen by the attested identity and
// the rule, never by anything the request says. Two identities A and B
// have different rules; B tries to reach A's credential through every
// request field; random interleavings of A and B (sequential and
// concurrent) through the real rules engine, the cache, the bearer
// injector and an HTTP upstream always deliver the requester's own
// credential. The upstream is an httptest recorder: it stands for any API
// and only needs to record the Authorization it received.
func TestCredentialBoundToIdentity(t *testing.T) {
	idA := broker.Identity{ID: "spiffe://example.org/team-a/app", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}
	idB := broker.Identity{ID: "spiffe://example.org/team-b/app", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}
	tokA := "CANARY-A-" + canary(t)
	tokB := "CANARY-B-" + canary(t)

	clock := newFakeClock()
	mint := minting(clock, time.Hour) // "<identity id>#<n>": bound to the caller that asked
	sources := map[string]broker.Source{
		"cred-a": NewStatic("cred-a", map[string]broker.Secret{broker.FieldToken: broker.NewSecret(tokA)}),
		"cred-b": NewStatic("cred-b", map[string]broker.Secret{broker.FieldToken: broker.NewSecret(tokB)}),
		"minted": NewCache("minted", mint, CacheOptions{TTL: 10 * time.Minute, Clock: clock}),
	}
	inj := func(cred string) *broker.Injection { return &broker.Injection{Credential: cred, Injector: Bearer()} }
	set, errs := rules.Compile([]rules.Spec{
		{Name: "a-only", Hosts: []string{"a.example.com"}, When: `workload.id == "` + idA.ID + `"`, Inject: inj("cred-a")},
		{Name: "api-a", Hosts: []string{"api.example.com"}, When: `workload.id == "` + idA.ID + `" && request.path.startsWith("/a/")`, Inject: inj("cred-a")},
		{Name: "api-b", Hosts: []string{"api.example.com"}, When: `workload.id == "` + idB.ID + `"`, Inject: inj("cred-b")},
		{Name: "shared", Hosts: []string{"shared.example.com"}, When: `workload.id in ["` + idA.ID + `", "` + idB.ID + `"]`, Inject: inj("minted")},
	}, rules.Options{})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	p := &broker.Pipeline{Policy: set, Sources: sources, Clock: clock}

	var mu sync.Mutex
	seen := map[string]string{} // request id -> Authorization at the upstream
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Header.Get("X-Test-Id")] = strings.Join(r.Header.Values("Authorization"), "|")
		mu.Unlock()
	}))
	defer up.Close()
	upURL, _ := url.Parse(up.URL)

	// hostile: request fields B (or A) can set, each naming the other
	// identity or its credential.
	hostile := func(victim broker.Identity, victimCred, victimTok string) []func(r *http.Request) {
		return []func(r *http.Request){
			func(r *http.Request) {},
			func(r *http.Request) { r.Header.Set("X-Keygate-Credential", victimCred) },
			func(r *http.Request) { r.Header.Set("X-Broker-Identity", victim.ID) },
			func(r *http.Request) { r.Header.Set("X-Keygate-On-Behalf-Of", victim.ID) },
			func(r *http.Request) { r.Header.Set("X-Forwarded-Client-Cert", "URI="+victim.ID) },
			func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+victimTok) },
			func(r *http.Request) { r.Header["authorization"] = []string{"Bearer " + victimTok} },
			func(r *http.Request) { r.Header.Set("Proxy-Authorization", "Bearer "+victimTok) },
			func(r *http.Request) {
				r.URL.RawQuery = "credential=" + victimCred + "&identity=" + url.QueryEscape(victim.ID) + "&rule=a-only"
			},
			func(r *http.Request) { r.URL.Path = "/a/" + url.PathEscape(victim.ID) },
			func(r *http.Request) { r.Header.Set("X-Amz-Security-Token", victimTok) },
		}
	}

	// send runs one request through the pipeline and, if allowed, to the
	// upstream; it returns what the upstream saw ("" when denied).
	send := func(t *testing.T, reqID string, id broker.Identity, host string, path *string, mutate func(*http.Request)) (string, error) {
		r, _ := http.NewRequest(http.MethodGet, "https://"+host+*path, nil)
		mutate(r)
		*path = r.URL.Path // a mutation may change it; the model judges what was sent
		r.Header.Set("X-Test-Id", reqID)
		h := map[string]string{}
		for k, v := range r.Header {
			h[strings.ToLower(k)] = strings.Join(v, ", ")
		}
		tg := broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolHTTPS, Host: host, Port: 443,
			Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Headers: h}
		_, c, err := p.Authorize(context.Background(), id, tg, r)
		if err != nil {
			return "", err
		}
		if c.Release != nil {
			defer c.Release(context.Background())
		}
		// Forward to the recorder, as the proxy would to the real host.
		r.URL.Scheme, r.URL.Host = "http", upURL.Host
		r.RequestURI = ""
		resp, err := http.DefaultTransport.RoundTrip(r)
		if err != nil {
			t.Fatalf("upstream: %v", err)
		}
		resp.Body.Close()
		mu.Lock()
		defer mu.Unlock()
		return seen[reqID], nil
	}

	// want is the model: what the upstream must see for this caller, or ""
	// for a deny. A minted credential is checked by its owner prefix.
	want := func(id broker.Identity, host, path string) (exact, prefix string) {
		switch host {
		case "a.example.com":
			if id.ID == idA.ID {
				return "Bearer " + tokA, ""
			}
		case "api.example.com":
			if id.ID == idB.ID {
				return "Bearer " + tokB, ""
			}
			if strings.HasPrefix(path, "/a/") {
				return "Bearer " + tokA, ""
			}
		case "shared.example.com":
			return "", "Bearer " + id.ID + "#"
		}
		return "", ""
	}
	check := func(t *testing.T, label string, id broker.Identity, host, path, got string, err error) {
		t.Helper()
		exact, prefix := want(id, host, path)
		switch {
		case exact == "" && prefix == "":
			var be *broker.Error
			if !errors.As(err, &be) || be.Status() != http.StatusForbidden {
				t.Errorf("%s: want a 403 deny, got err %v and an upstream request: %t", label, err, got != "")
			}
		case err != nil:
			t.Errorf("%s: %v", label, err)
		case exact != "" && got != exact, prefix != "" && !strings.HasPrefix(got, prefix):
			// Name the credential by owner, never print it.
			owner := "neither"
			switch {
			case strings.Contains(got, tokA) || strings.Contains(got, idA.ID+"#"):
				owner = "A's"
			case strings.Contains(got, tokB) || strings.Contains(got, idB.ID+"#"):
				owner = "B's"
			}
			t.Errorf("%s: the upstream received %s credential (%d Authorization values)", label, owner, strings.Count(got, "|")+1)
		}
	}

	t.Run("B through every request field", func(t *testing.T) {
		n := 0
		for _, host := range []string{"a.example.com", "api.example.com", "shared.example.com"} {
			for i, m := range hostile(idA, "cred-a", tokA) {
				for _, path := range []string{"/", "/a/x"} {
					n++
					got, err := send(t, fmt.Sprintf("b-%d", n), idB, host, &path, m)
					check(t, fmt.Sprintf("B %s%s attempt %d", host, path, i), idB, host, path, got, err)
					if strings.Contains(got, tokA) || strings.Contains(got, idA.ID+"#") {
						t.Fatalf("B %s%s attempt %d: A's credential reached the upstream", host, path, i)
					}
				}
			}
		}
		// And A cannot reach B's in the same ways.
		for _, host := range []string{"api.example.com", "shared.example.com"} {
			for i, m := range hostile(idB, "cred-b", tokB) {
				n++
				path := "/a/x"
				got, err := send(t, fmt.Sprintf("a-%d", n), idA, host, &path, m)
				check(t, fmt.Sprintf("A %s attempt %d", host, i), idA, host, path, got, err)
			}
		}
	})

	hosts := []string{"a.example.com", "api.example.com", "shared.example.com"}
	paths := []string{"/", "/a/x", "/b"}
	t.Run("random interleavings, sequential", func(t *testing.T) {
		for seed := range uint64(20) {
			rng := rand.New(rand.NewPCG(seed, 7))
			for i := range 100 {
				id, victim, vc, vt := idA, idB, "cred-b", tokB
				if rng.IntN(2) == 1 {
					id, victim, vc, vt = idB, idA, "cred-a", tokA
				}
				if rng.IntN(10) == 0 {
					clock.Advance(time.Duration(rng.IntN(120)) * time.Second)
				}
				ms := hostile(victim, vc, vt)
				host, path := hosts[rng.IntN(len(hosts))], paths[rng.IntN(len(paths))]
				got, err := send(t, fmt.Sprintf("s%d-%d", seed, i), id, host, &path, ms[rng.IntN(len(ms))])
				check(t, fmt.Sprintf("seed %d step %d", seed, i), id, host, path, got, err)
			}
			if t.Failed() {
				t.Fatalf("seed %d", seed)
			}
		}
	})
	t.Run("random interleavings, concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(g), 9))
				for i := range 60 {
					id, victim, vc, vt := idA, idB, "cred-b", tokB
					if rng.IntN(2) == 1 {
						id, victim, vc, vt = idB, idA, "cred-a", tokA
					}
					ms := hostile(victim, vc, vt)
					host, path := hosts[rng.IntN(len(hosts))], paths[rng.IntN(len(paths))]
					got, err := send(t, fmt.Sprintf("c%d-%d", g, i), id, host, &path, ms[rng.IntN(len(ms))])
					check(t, fmt.Sprintf("goroutine %d step %d", g, i), id, host, path, got, err)
				}
			})
		}
		wg.Wait()
		if n := mint.calls.Load(); n < 2 {
			t.Fatalf("%d mints: the shared rule was not exercised for both identities", n)
		}
	})

	// The cache key: identity (every part), rule, credential and every
	// grant parameter, so a session policy (or anything else derived from
	// the target through WithParams) separates entries. The target host
	// itself is deliberately not in the key (see doc.go): the rule bounds
	// where a credential may go.
	t.Run("cache key components", func(t *testing.T) {
		g := broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{ParamSessionPolicy: `{"v":1}`},
			Target: broker.Target{Host: "a.example.com"}}
		base := cacheKey(idA, g)
		variants := map[string]string{
			"identity":      cacheKey(idB, g),
			"rule":          cacheKey(idA, broker.Grant{Rule: "r2", Credential: "c", Params: g.Params}),
			"credential":    cacheKey(idA, broker.Grant{Rule: "r", Credential: "c2", Params: g.Params}),
			"policy":        cacheKey(idA, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{ParamSessionPolicy: `{"v":2}`}}),
			"no policy":     cacheKey(idA, broker.Grant{Rule: "r", Credential: "c"}),
			"delegator":     cacheKey(broker.Identity{ID: idA.ID, Method: idA.Method, TrustDomain: idA.TrustDomain, Delegator: broker.Delegator{Sub: "u"}}, g),
			"auth method":   cacheKey(broker.Identity{ID: idA.ID, Method: broker.MethodSPIFFEJWT, TrustDomain: idA.TrustDomain}, g),
			"trust domain ": cacheKey(broker.Identity{ID: idA.ID, Method: idA.Method, TrustDomain: "other.org"}, g),
		}
		for name, k := range variants {
			if k == base {
				t.Errorf("the cache key ignores the %s", name)
			}
		}
		// A target-dependent parameter reaches the key through WithParams.
		src := minting(newFakeClock(), 0)
		byHost := WithParams(NewCache("c", src, CacheOptions{TTL: time.Hour}),
			func(_ context.Context, _ broker.Identity, tg broker.Target) (map[string]string, error) {
				return map[string]string{ParamSessionPolicy: `{"host":"` + tg.Host + `"}`}, nil
			})
		for _, h := range []string{"a.example.com", "b.example.com", "a.example.com"} {
			if _, err := byHost.Credential(context.Background(), idA, broker.Grant{Rule: "r", Credential: "c", Target: broker.Target{Host: h}}); err != nil {
				t.Fatal(err)
			}
		}
		if n := src.calls.Load(); n != 2 {
			t.Fatalf("%d source calls for two targets (one repeated), want 2", n)
		}
	})
}
