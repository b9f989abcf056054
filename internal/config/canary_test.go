package config

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/intercept/ca"
)

// The secret values below are what env: and file: references resolve to.
// Whatever goes wrong in the file, no Problem may quote them, in plain or in
// base64 form. They are registered for the suite-wide sweep (canarytest).
var (
	canaryEnv  = canarytest.New("config env secret")
	canaryFile = canarytest.New("config file secret")
	canaryPEM  = canarytest.New("config pem secret")
)

func canaryForms() []string {
	var out []string
	for _, c := range []string{canaryEnv, canaryFile, canaryPEM} {
		out = append(out, c, base64.StdEncoding.EncodeToString([]byte(c)))
	}
	return out
}

// TestSecretCanaryNeverInProblems provokes every error path it can reach
// (decode, validate, rule compilation, secret resolution, CA and bundle
// loading) in a file whose secrets resolve to canaries.
func TestSecretCanaryNeverInProblems(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KG_CANARY", canaryEnv)
	t.Setenv("KG_CANARY_TOO", canaryEnv+"\r\n")
	writeFile(t, dir, "canary", canaryFile+"\n", 0o600)
	writeFile(t, dir, "canary-2nl", canaryFile+"\n\n", 0o600)
	big := strings.Repeat(canaryFile, (1<<20)/len(canaryFile)+2)
	writeFile(t, dir, "canary-big", big, 0o600)
	// PEM armour around the canary: a parser that quoted what it failed
	// to parse would leak it.
	pemCanary := "-----BEGIN CERTIFICATE-----\n" + base64.StdEncoding.EncodeToString([]byte(canaryPEM)) +
		"\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n" +
		base64.StdEncoding.EncodeToString([]byte(canaryPEM)) + "\n-----END PRIVATE KEY-----\n"
	writeFile(t, dir, "canary.pem", pemCanary, 0o600)
	writeFile(t, dir, "canary-open.pem", pemCanary, 0o644)
	if err := ca.Init(filepath.Join(dir, "pki"), nil, nil); err != nil {
		t.Fatal(err)
	}

	creds := `credentials:
  from-env: {source: static, value: env:KG_CANARY}
  from-env-crlf: {source: static, value: env:KG_CANARY_TOO}
  from-file: {source: static, value: file:canary}
  two-newlines: {source: static, value: file:canary-2nl}
  pair: {source: static, values: {username: env:KG_CANARY, password: file:canary}}
`
	tests := []struct {
		name string
		yaml string // after minimalHead unless it starts with "listen:"
	}{
		{name: "bad CEL", yaml: creds + `rules:
  - name: r
    hosts: [api.example.com]
    when: 'request.headers["authorization"] == "` + "${KG_CANARY}" + `" &&'
    inject: {credential: from-env, as: bearer}
`},
		{name: "bad injectors", yaml: creds + `rules:
  - {name: a, hosts: [a.example.com], inject: {credential: from-env, as: {header: {name: "Bad Name", format: "{{token}}"}}}}
  - {name: b, hosts: [b.example.com], inject: {credential: from-file, as: {header: {name: X-K, format: "{{token"}}}}
  - {name: c, hosts: [c.example.com], inject: {credential: pair, as: sigv4}}
  - {name: d, hosts: [d.example.com], inject: {credential: pair, as: {query: {name: "a b"}}}}
  - {name: e, hosts: [e.example.com], inject: {credential: from-file, as: {header: {name: X-K, format: "{{token}}", extra: 1}}}}
`},
		{name: "tunnel, deny and undefined credential", yaml: creds + `rules:
  - {name: t, hosts: [t.example.com], action: tunnel, inject: {credential: from-env, as: bearer}}
  - {name: d, hosts: [d.example.com], action: deny, inject: {credential: from-file, as: bearer}}
  - {name: u, hosts: [u.example.com], inject: {credential: missing, as: bearer}}
`},
		{name: "secrets resolve, other things fail", yaml: creds + `  unset: {source: static, value: env:KG_CANARY_SURELY_UNSET}
  missing: {source: static, value: file:missing}
  too-big: {source: static, value: file:canary-big}
egress: {ca_bundle: canary.pem}
rules:
  - {name: r, hosts: [api.example.com], inject: {credential: from-env, as: bearer}}
`},
		{name: "CA files hold the canary", yaml: `listen: {proxy: 127.0.0.1:15080}
ca: {cert: canary.pem, key: canary.pem}
attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]
` + creds},
		{name: "CA key file holds the canary", yaml: `listen: {proxy: 127.0.0.1:15080}
ca: {cert: pki/ca.pem, key: canary.pem}
attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]
` + creds},
		{name: "CA key readable by others", yaml: `listen: {proxy: 127.0.0.1:15080}
ca: {cert: pki/ca.pem, key: canary-open.pem}
attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]
` + creds},
		{name: "secret file used as the bundle", yaml: creds + "egress: {ca_bundle: canary}\n"},
		{name: "decode errors beside resolved secrets", yaml: creds + `limits: {idle_timeout: forever}
rules:
  - {name: r, hosts: [api.example.com], ports: [https], inject: {credential: from-env, as: bearer}}
`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := tc.yaml
			if !strings.HasPrefix(src, "listen:") {
				src = minimalHead + src
			}
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".yaml")
			if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			log, logs := newBufferLogger()
			c, err := LoadFile(path)
			if err == nil {
				_, err = build(t, c, BuildOptions{Logger: log, DryRun: true})
			}
			ps := asProblems(t, err)
			if len(ps) == 0 {
				t.Fatal("the file was accepted; this case must provoke an error")
			}
			for _, s := range canaryForms() {
				mustNotContain(t, "problems", ps.Error(), s)
				mustNotContain(t, "logs", logs.String(), s)
			}
			t.Logf("%d problems, none quoting a secret:\n%s", len(ps), ps.Error())
		})
	}

	// And when everything is fine, nothing about the values is logged either.
	t.Run("success", func(t *testing.T) {
		path := writeFile(t, dir, "ok.yaml", minimalHead+creds+`rules:
  - {name: r, hosts: [api.example.com], inject: {credential: pair, as: basic}}
`, 0o644)
		log, logs := newBufferLogger()
		c, err := LoadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := build(t, c, BuildOptions{Logger: log, DryRun: true}); err != nil {
			t.Fatal(err)
		}
		for _, s := range canaryForms() {
			mustNotContain(t, "logs", logs.String(), s)
		}
	})
}

// TestPastedSecretNotEchoed: a literal secret where a reference belongs is
// refused without quoting it, in value and in values.
func TestPastedSecretNotEchoed(t *testing.T) {
	const pasted = "ghp_CANARYpastedLiteralToken0123456789"
	for _, tc := range []struct{ name, creds string }{
		{"value", "  k: {source: static, value: " + pasted + "}\n"},
		{"values", "  k: {source: static, values: {username: svc, password: " + pasted + "}}\n"},
		{"env-looking", "  k: {source: static, value: \"env:" + pasted + "-x\"}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("p.yaml", t.TempDir(), []byte(minimalHead+"credentials:\n"+tc.creds))
			if err != nil {
				t.Fatal(err)
			}
			_, err = build(t, c, BuildOptions{Logger: zap.NewNop(), DryRun: true})
			ps := asProblems(t, err)
			if !strings.Contains(ps.Error(), "env:NAME or file:PATH") {
				t.Errorf("problems do not explain the reference syntax:\n%s", ps.Error())
			}
			for _, s := range []string{pasted, pasted[:10], "CANARY"} {
				mustNotContain(t, "problems", ps.Error(), s)
			}
		})
	}
}
