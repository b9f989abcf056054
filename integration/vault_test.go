package integration

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/testservers"
)

// TestVaultKVThroughBroker: the real broker binary is the only Vault client.
// It logs in to a real Vault (dev server) with AppRole — no Vault token
// anywhere — reads a KV v2 API key, and injects it into curl's request to a
// TLS upstream. curl's environment holds no secret, and the request it sent
// (curl -v prints every header) carries none; the upstream receives exactly
// the key. With Vault stopped the broker answers 503 and forwards nothing.
// The API key is the harness canary, so every transcript and the broker's
// output are swept for it at cleanup.
// vaultKVConfig: the canary is a KV v2 secret the broker reads from a real
// Vault after an AppRole login, cached for @CACHE@ ("none": every request
// reads Vault).
const vaultKVConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: ci-runner, cidrs: [127.0.0.1/32]}]}
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [{{index .Ports "up"}}], ca_bundle: "{{.Bundle}}"}
vaults:
  legacy:
    address: "@VAULT@"
    auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}
credentials:
  github: {source: vault_kv, vault: legacy, path: secret/data/app/github, field: token, cache: @CACHE@}
rules:
  - name: api
    hosts: [localhost]
    inject: {credential: github, as: bearer}
`

func TestVaultKVThroughBroker(t *testing.T) {
	curl := requireTool(t, "curl")
	v := testservers.StartVault(t)
	h := newHarness(t)
	up := newUpstream(t, "vault-api", nil)

	dir := t.TempDir()
	seed := func() *appRole {
		role := newAppRole(t, v, dir, kvReadPolicy, "10m")
		v.Must("POST", "secret/data/app/github", map[string]any{"data": map[string]any{"token": h.canary}})
		return role
	}
	role := seed()
	cfg := strings.NewReplacer("@VAULT@", v.Addr, "@ROLE@", role.roleFile, "@SECRET@", role.secretFile, "@CACHE@", "none").Replace(vaultKVConfig)
	b := h.start(brokerSpec{name: "vault", config: cfg}, map[string]int{"up": up.port()})
	waitReadyz(t, b, testTimeout)
	target := fmt.Sprintf("https://localhost:%d/repos", up.port())

	env := []string{"HTTPS_PROXY=" + b.proxyURL()}
	for _, e := range append(cleanEnv(h.dir), env...) {
		if strings.Contains(e, h.canary) || strings.Contains(e, role.secretID) {
			t.Fatal("the workload's environment holds a secret")
		}
	}
	res := h.runTool(curl, env, "", curlArgs("-v", "--cacert", h.caPEM(), "-w", "\nstatus=%{http_code}", target)...)
	if code := parseCurlStatus(t, res.stdout); res.code != 0 || code != http.StatusOK {
		t.Fatalf("curl: exit %d status %d\n%s", res.code, code, redactCanary(res.stderr))
	}
	if strings.Contains(strings.ToLower(res.stderr), "> authorization:") {
		t.Fatal("curl sent an Authorization header itself")
	}
	up.expectInjected(t, 1, h.bearer())
	rid := ""
	for _, l := range strings.Split(res.stderr, "\n") {
		if k, val, ok := strings.Cut(strings.TrimPrefix(l, "< "), ":"); ok && strings.EqualFold(k, "x-keygate-request-id") {
			rid = strings.TrimSpace(val)
		}
	}
	line := b.auditLine(t, rid)
	if line["credential.kind"] != "vault_kv" || line["credential.vault_path"] != "secret/data/app/github" {
		t.Fatalf("audit line = %v", line)
	}

	// Vault down: fail closed, nothing forwarded.
	v.Stop()
	res = h.runTool(curl, env, "", curlArgs("--cacert", h.caPEM(), "-o", "/dev/null", "-w", "\nstatus=%{http_code}", target)...)
	if code := parseCurlStatus(t, res.stdout); code != http.StatusServiceUnavailable {
		t.Fatalf("with Vault stopped: status %d, want 503", code)
	}
	up.expectInjected(t, 1, h.bearer())

	// Vault back (dev mode starts empty): re-seed, and the broker recovers
	// without a restart, logging in again with the new AppRole secret.
	v.Start()
	seed()
	res = h.runTool(curl, env, "", curlArgs("--cacert", h.caPEM(), "-o", "/dev/null", "-w", "\nstatus=%{http_code}", target)...)
	if code := parseCurlStatus(t, res.stdout); code != http.StatusOK {
		t.Fatalf("after Vault came back: status %d, want 200\n%s", code, redactCanary(string(b.output())))
	}
	up.expectInjected(t, 2, h.bearer())
}
