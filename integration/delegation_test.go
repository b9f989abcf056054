package integration

import (
	"fmt"
	"net/http"
	"testing"
	"time"
)

// delegationConfig: CI jobs attest with the GitHub-shaped issuer; the person
// they act for sends a token from a second (SSO-shaped) issuer in
// X-Keygate-On-Behalf-Of. The rule needs both.
const delegationConfig = `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - {type: oidc, name: github, issuer: "http://127.0.0.1:{{index .Ports "issuer"}}", audiences: [keygate]}
delegation:
  issuers:
    - {name: sso, issuer: "http://127.0.0.1:{{index .Ports "sso"}}", audiences: [keygate]}
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
credentials:
  app-token: {source: static, value: env:KG_E2E_APP_TOKEN}
rules:
  - name: app-for-alice
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.claims.repository == "acme/app" && has(delegator.sub) && delegator.sub == "alice@example.com"'
    inject: {credential: app-token, as: bearer}
`

// TestDelegationEndToEnd: the delegated user is verified, appears in the
// audit line, decides with the workload, and its token never reaches the
// upstream.
func TestDelegationEndToEnd(t *testing.T) {
	h := newHarness(t)
	w := newSecretWatch(h)
	ci, sso := newTestIssuer(t, w), newTestIssuer(t, w)
	up := w.upstream(newUpstream(t, "api", nil))
	app := w.credential()
	b := h.start(brokerSpec{name: "delegation", config: delegationConfig, env: []string{oidcAppEnv + "=" + app}},
		map[string]int{"issuer": ci.port(), "sso": sso.port(), "upstream": up.port()})
	o := &oidcWorld{h: h, w: w, is: ci, up: up, b: b, app: app}

	job := ci.mint(ci.githubClaims("acme/app"))
	user := func(sub string) string {
		now := time.Now()
		return sso.mint(map[string]any{"iss": sso.url, "aud": "keygate", "sub": sub,
			"iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix()})
	}
	forged := ci.mint(withClaims(ci.githubClaims("acme/app"), map[string]any{"sub": "alice@example.com"}))

	tests := []struct {
		name   string
		inner  []string
		status int
	}{
		{"the job alone", nil, http.StatusForbidden},
		{"the job for alice", []string{"X-Keygate-On-Behalf-Of: " + user("alice@example.com")}, http.StatusOK},
		{"the job for bob", []string{"X-Keygate-On-Behalf-Of: Bearer " + user("bob@example.com")}, http.StatusForbidden},
		{"a user token from the CI issuer", []string{"X-Keygate-On-Behalf-Of: " + forged}, http.StatusProxyAuthRequired},
		{"garbage", []string{"X-Keygate-On-Behalf-Of: alice"}, http.StatusProxyAuthRequired},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fmt.Sprintf("/d%d", i)
			resp, body := o.rawGet(path, []string{bearerLine(job)}, tt.inner...)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.status, body)
			}
			line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
			if tt.status == http.StatusOK {
				expectOneInjected(t, up, path, app)
				if line["delegator.sub"] != "alice@example.com" || line["workload.method"] != "oidc" {
					t.Errorf("audit delegator.sub %v, workload.method %v", line["delegator.sub"], line["workload.method"])
				}
				return
			}
			if n := len(authFor(up, path)); n != 0 {
				t.Errorf("upstream received %d requests for a refused caller", n)
			}
		})
	}
	for _, r := range up.requests() {
		if len(r.Header.Values("X-Keygate-On-Behalf-Of")) != 0 {
			t.Fatal("the user's token reached the upstream")
		}
	}
}
