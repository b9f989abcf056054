package config

import (
	"context"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// These tests check what a written config means once compiled: port
// defaults from egress.connect_ports, the http default of 80, host patterns,
// CONNECT-phase partial evaluation, and that an evaluation error denies.
// docs/configuration.md describes exactly these behaviours.

type decideCase struct {
	name     string
	id       broker.Identity
	target   broker.Target
	action   broker.Action
	rule     string
	injector string // Kind of the injector; "" for none
	cred     string
	plain    bool // AllowPlaintext
	wantErr  bool
}

var (
	buildFarm = broker.Identity{ID: "build-farm", Method: broker.MethodCIDR}
	localID   = broker.Identity{ID: "local", Method: broker.MethodCIDR}
)

func connectTo(host string, port int) broker.Target {
	return broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: host, Port: port}
}

func request(proto, method, host string, port int, path string) broker.Target {
	return broker.Target{Phase: broker.PhaseRequest, Protocol: proto, Method: method, Host: host, Port: port, Path: path,
		Headers: map[string]string{}}
}

func runDecideCases(t *testing.T, p *Policy, cases []decideCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := p.Rules.Decide(context.Background(), tc.id, tc.target)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if d.Action != tc.action || d.Rule != tc.rule {
				t.Fatalf("decision = %v by %q (%s), want %v by %q", d.Action, d.Rule, d.Reason, tc.action, tc.rule)
			}
			if d.AllowPlaintext != tc.plain {
				t.Errorf("AllowPlaintext = %v", d.AllowPlaintext)
			}
			switch {
			case tc.injector == "" && d.Inject != nil:
				t.Errorf("unexpected injection of %q", d.Inject.Credential)
			case tc.injector != "" && d.Inject == nil:
				t.Errorf("no injection, want %s of %q", tc.injector, tc.cred)
			case tc.injector != "":
				if d.Inject.Injector == nil || d.Inject.Injector.Kind() != tc.injector || d.Inject.Credential != tc.cred {
					t.Errorf("inject = %+v, want %s of %q", d.Inject, tc.injector, tc.cred)
				}
			}
		})
	}
}

func TestFullFixtureDecisions(t *testing.T) {
	path := stageFixture(t, "full", fullSetup)
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Policy(nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.Kinds["api-token"] != "static" || len(p.Kinds) != 3 {
		t.Errorf("Kinds = %v", p.Kinds)
	}
	get := func(host string, port int, path string) broker.Target {
		return request(broker.ProtocolHTTPS, "GET", host, port, path)
	}
	withClaims := localID
	withClaims.Claims = map[string]any{"blocked": true}
	runDecideCases(t, p, []decideCase{
		{name: "github GET by build-farm is injected", id: buildFarm, target: get("api.github.com", 443, "/repos"),
			action: broker.Allow, rule: "github-reads", injector: "bearer", cred: "api-token"},
		{name: "github POST falls to the deny rule", id: buildFarm, target: request("https", "POST", "api.github.com", 443, "/repos"),
			action: broker.Deny, rule: "github-writes-denied"},
		{name: "github GET by another identity is denied", id: localID, target: get("uploads.github.com", 443, "/"),
			action: broker.Deny, rule: "github-writes-denied"},
		{name: "CONNECT intercepts a rule that needs the method", id: buildFarm, target: connectTo("api.github.com", 443),
			action: broker.Allow, rule: "github-reads"},
		{name: "CONNECT on a connect_ports port", id: buildFarm, target: connectTo("api.github.com", 8443),
			action: broker.Allow, rule: "github-reads"},
		{name: "CONNECT on another port matches no rule", id: buildFarm, target: connectTo("api.github.com", 444),
			action: broker.Deny, rule: ""},
		{name: "wildcard with explicit ports", id: localID, target: get("db.corp.example.com", 9443, "/"),
			action: broker.Allow, rule: "internal-basic", injector: "basic", cred: "basic-pair"},
		{name: "explicit ports replace the defaults", id: localID, target: get("db.corp.example.com", 443, "/"),
			action: broker.Deny, rule: "everything-else-explicitly"},
		{name: "wildcard never matches the apex", id: localID, target: get("corp.example.com", 9443, "/"),
			action: broker.Deny, rule: ""},
		{name: "header with format", id: localID, target: get("api.example.com", 443, "/v1"),
			action: broker.Allow, rule: "header-with-format", injector: "header", cred: "file-token"},
		{name: "has() guards an optional claim", id: withClaims, target: get("api.example.com", 443, "/v1"),
			action: broker.Deny, rule: "everything-else-explicitly"},
		{name: "header with default format", id: localID, target: get("api2.example.com", 8443, "/"),
			action: broker.Allow, rule: "header-default-format", injector: "header", cred: "file-token"},
		{name: "http defaults to port 80", id: localID, target: request("http", "GET", "api2.example.com", 80, "/"),
			action: broker.Allow, rule: "header-default-format", injector: "header", cred: "file-token"},
		{name: "http on 443 is not a default http port", id: localID, target: request("http", "GET", "api2.example.com", 443, "/"),
			action: broker.Deny, rule: ""},
		{name: "query", id: localID, target: get("maps.example.com", 443, "/geo"),
			action: broker.Allow, rule: "query-param", injector: "query", cred: "api-token"},
		{name: "plaintext allowed by the rule", id: localID, target: request("http", "GET", "legacy.corp.example.com", 80, "/"),
			action: broker.Allow, rule: "legacy-plaintext", injector: "basic", cred: "basic-pair", plain: true},
		{name: "tunnel", id: localID, target: connectTo("pinned.example.com", 443),
			action: broker.Tunnel, rule: "pinned-tunnel"},
		{name: "metadata address denied", id: localID, target: request("http", "GET", "169.254.169.254", 80, "/latest"),
			action: broker.Deny, rule: "block-metadata"},
		{name: "IPv6 host pattern", id: localID, target: request("http", "GET", "fd00:ec2::254", 80, "/"),
			action: broker.Deny, rule: "block-metadata"},
		{name: "anything else hits the catch-all deny", id: localID, target: get("example.org", 443, "/"),
			action: broker.Deny, rule: "everything-else-explicitly"},
	})
}

func TestRuleSemantics(t *testing.T) {
	const rulesYAML = `credentials:
  tok: {source: static, value: env:TOK}
rules:
  - name: by-repo
    hosts: [api.github.com]
    when: 'workload.claims.repository == "acme/app"'
    inject: {credential: tok, as: bearer}
  - name: later-allow
    hosts: [api.github.com]
  - name: guarded
    hosts: [guarded.example.com]
    when: 'has(workload.claims.repository) && workload.claims.repository == "acme/app"'
    inject: {credential: tok, as: bearer}
  - name: guarded-fallback
    hosts: [guarded.example.com]
    action: deny
  - name: deny-delete
    hosts: [files.example.com]
    when: 'request.method == "DELETE"'
    action: deny
  - name: files-tunnel
    hosts: [files.example.com]
    action: tunnel
  - name: case-insensitive
    hosts: [MixedCase.Example.COM]
  - name: headers-are-lower-case
    hosts: [hdr.example.com]
    when: '"x-team" in request.headers && request.headers["x-team"] == "infra"'
`
	c, err := Parse("rules.yaml", t.TempDir(), []byte(minimalHead+rulesYAML))
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Policy(nil)
	if err != nil {
		t.Fatal(err)
	}
	withRepo := localID
	withRepo.Claims = map[string]any{"repository": "acme/app"}
	hdr := request("https", "GET", "hdr.example.com", 443, "/")
	hdr.Headers = map[string]string{"x-team": "infra"}
	runDecideCases(t, p, []decideCase{
		{name: "claim present", id: withRepo, target: request("https", "GET", "api.github.com", 443, "/"),
			action: broker.Allow, rule: "by-repo", injector: "bearer", cred: "tok"},
		// A missing key is an evaluation error, and an error denies: the
		// later, more permissive rule is never reached.
		{name: "missing claim denies, naming the rule", id: localID, target: request("https", "GET", "api.github.com", 443, "/"),
			action: broker.Deny, rule: "by-repo", wantErr: true},
		{name: "has() makes a missing claim false", id: localID, target: request("https", "GET", "guarded.example.com", 443, "/"),
			action: broker.Deny, rule: "guarded-fallback"},
		{name: "has() with the claim", id: withRepo, target: request("https", "GET", "guarded.example.com", 443, "/"),
			action: broker.Allow, rule: "guarded", injector: "bearer", cred: "tok"},
		// At CONNECT the method is unknown: the deny rule might apply to some
		// requests, so the later tunnel becomes an interception.
		{name: "deny depending on the method turns a tunnel into interception", id: localID, target: connectTo("files.example.com", 443),
			action: broker.Allow, rule: "files-tunnel"},
		{name: "then each request is judged", id: localID, target: request("https", "DELETE", "files.example.com", 443, "/x"),
			action: broker.Deny, rule: "deny-delete"},
		{name: "host patterns are case-insensitive", id: localID, target: connectTo("mixedcase.example.com", 443),
			action: broker.Allow, rule: "case-insensitive"},
		{name: "header names are lower case", id: localID, target: hdr,
			action: broker.Allow, rule: "headers-are-lower-case"},
	})
}

// TestConnectPortsDefault: without egress.connect_ports a rule without
// ports matches CONNECT on 443 only; with it, the listed ports.
func TestConnectPortsDefault(t *testing.T) {
	for _, tc := range []struct {
		name    string
		egress  string
		allowed []int
		denied  []int
	}{
		{name: "default", egress: "", allowed: []int{443}, denied: []int{8443, 80, 22}},
		{name: "configured", egress: "egress: {connect_ports: [443, 8443]}\n", allowed: []int{443, 8443}, denied: []int{80, 22}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("p.yaml", t.TempDir(), []byte(minimalHead+tc.egress+"rules:\n  - {name: any, hosts: [\"*\"]}\n"))
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.Policy(nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, port := range tc.allowed {
				if d, _ := p.Rules.Decide(context.Background(), localID, connectTo("example.com", port)); d.Action != broker.Allow {
					t.Errorf("CONNECT :%d = %v (%s), want allow", port, d.Action, d.Reason)
				}
			}
			for _, port := range tc.denied {
				if d, _ := p.Rules.Decide(context.Background(), localID, connectTo("example.com", port)); d.Action != broker.Deny {
					t.Errorf("CONNECT :%d = %v, want deny", port, d.Action)
				}
			}
		})
	}
}

// TestPolicyReportsLikeBuild: explain's Policy reports the same problems as
// validate (Build) does, without resolving any secret.
func TestPolicyReportsLikeBuild(t *testing.T) {
	src := minimalHead + `credentials:
  tok: {source: static, value: env:KG_POLICY_UNSET_VARIABLE}
rules:
  - name: r
    hosts: [api.example.com]
    when: 'request.method == 1 +'
    inject: {credential: tok, as: bearer}
`
	c, err := Parse("p.yaml", t.TempDir(), []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	_, perr := c.Policy(nil)
	pps := asProblems(t, perr)
	if len(pps) != 1 || pps[0].Line != 12 || !strings.Contains(pps[0].Msg, "Syntax error") {
		t.Errorf("Policy problems = %v", pps)
	}
	// Fix the expression: Policy is then happy although the env variable is
	// unset (it resolves nothing), while Build reports the missing variable.
	c, err = Parse("p.yaml", t.TempDir(), []byte(strings.Replace(src, "== 1 +", `== "GET"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Policy(nil); err != nil {
		t.Errorf("Policy resolved a secret: %v", err)
	}
}
