// Package ci holds the CI quick starts (github-actions/, gitlab/): broker
// configs, their rule tests and example pipeline files. This test is what
// keeps them honest: every broker config shipped here passes `broker
// validate` (decoded, validated, rules compiled and every source built
// offline, with the files and variables it references created), every
// rule test passes, and the pipeline files request an OIDC token and carry
// no secret.
package ci

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"gopkg.in/yaml.v3"

	"github.com/keygate/broker/internal/config"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/ruletest"
)

// brokerConfigs are the keygate configs shipped here (not the rule tests,
// not the pipeline files).
func brokerConfigs(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("*/keygate*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, f := range files {
		if !strings.HasSuffix(f, "-tests.yaml") {
			out = append(out, f)
		}
	}
	if len(out) < 3 {
		t.Fatalf("found %v; want the github-actions and gitlab configs", out)
	}
	return out
}

func write(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

func rsaPEM(t *testing.T) []byte {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
}

func ecPEM(t *testing.T) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// stage copies a config into a fresh directory and creates what it
// references: the CA, secret files and variables (private keys as real
// PEM keys, other secrets as placeholders).
func stage(t *testing.T, name string) string {
	t.Helper()
	src, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, filepath.Base(name))
	write(t, path, src, 0o644)
	c, err := config.LoadFile(path)
	if err != nil {
		t.Fatalf("%s does not decode and validate:\n%v", name, err)
	}
	if !c.CA.Ephemeral {
		pki := filepath.Join(t.TempDir(), "pki")
		if err := ca.Init(pki, nil, nil); err != nil {
			t.Fatal(err)
		}
		for dst, f := range map[string]string{c.CA.Cert: ca.CertFile, c.CA.Key: ca.KeyFile} {
			b, err := os.ReadFile(filepath.Join(pki, f))
			if err != nil {
				t.Fatal(err)
			}
			write(t, filepath.Join(dir, dst), b, 0o600)
		}
	}
	provide := func(ref string, value []byte) {
		switch {
		case strings.HasPrefix(ref, "env:"):
			t.Setenv(strings.TrimPrefix(ref, "env:"), string(value))
		case strings.HasPrefix(ref, "file:"):
			p := strings.TrimPrefix(ref, "file:")
			if filepath.IsAbs(p) {
				t.Fatalf("%s: file:%s is absolute; ship paths relative to the config", name, p)
			}
			write(t, filepath.Join(dir, p), value, 0o600)
		}
	}
	for _, cr := range c.Credentials {
		provide(cr.Value, []byte("placeholder-secret"))
		for _, v := range cr.Values {
			provide(v, []byte("placeholder-secret"))
		}
		if cr.ClientSecret != nil {
			provide(cr.ClientSecret.Ref, []byte("placeholder-client-secret"))
		}
		if cr.PrivateKey != nil {
			key := ecPEM(t)
			if cr.Source == "github_app" {
				key = rsaPEM(t)
			}
			provide(cr.PrivateKey.Ref, key)
		}
	}
	return path
}

// TestConfigsPassBrokerValidate is `broker validate` on every config.
func TestConfigsPassBrokerValidate(t *testing.T) {
	for _, name := range brokerConfigs(t) {
		t.Run(name, func(t *testing.T) {
			c, err := config.LoadFile(name)
			if err != nil {
				t.Fatalf("LoadFile: %v", err)
			}
			if _, err := c.Policy(nil); err != nil {
				t.Fatalf("rules: %v", err)
			}
			c, err = config.LoadFile(stage(t, name))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Build(config.BuildOptions{Logger: zap.NewNop(), DryRun: true}); err != nil {
				t.Fatalf("broker validate would print:\n%v", err)
			}
			// Token sources only: the quick starts are about minting per job.
			for n, cr := range c.Credentials {
				if cr.Source == "static" {
					t.Errorf("credential %q is static: the CI quick starts mint credentials per job", n)
				}
			}
		})
	}
}

// TestRuleTestsPass runs `broker test` on every rule test file.
func TestRuleTestsPass(t *testing.T) {
	files, err := filepath.Glob("*/keygate-tests.yaml")
	if err != nil || len(files) != 2 {
		t.Fatalf("rule test files %v, %v", files, err)
	}
	var out, errb bytes.Buffer
	sum := ruletest.RunFiles(files, ruletest.Options{}, &out, &errb)
	if !sum.OK() || sum.Passed < 10 {
		t.Fatalf("broker test: %+v\n%s\n%s", sum, out.String(), errb.String())
	}
}

// TestPipelinesHoldNoSecret: the pipeline files ask for an OIDC token with
// audience keygate, set the proxy with it, and (except the evaluation-only
// workflow-try.yml, which starts the broker itself) reference no secret.
func TestPipelinesHoldNoSecret(t *testing.T) {
	for _, tc := range []struct {
		file          string
		mayUseSecrets bool
	}{
		{"github-actions/workflow.yml", false},
		{"github-actions/workflow-try.yml", true},
		{"gitlab/gitlab-ci.yml", false},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(tc.file)
			if err != nil {
				t.Fatal(err)
			}
			var doc map[string]any
			if err := yaml.Unmarshal(b, &doc); err != nil {
				t.Fatalf("not YAML: %v", err)
			}
			s := string(b)
			if strings.HasPrefix(tc.file, "github-actions/") {
				perms, _ := doc["permissions"].(map[string]any)
				if perms["id-token"] != "write" {
					t.Errorf("permissions.id-token is %v, want write", perms["id-token"])
				}
				if !strings.Contains(s, "audience=keygate") || !strings.Contains(s, "::add-mask::") {
					t.Error("the OIDC token is not requested for audience keygate, or not masked")
				}
			} else {
				job, _ := doc["build"].(map[string]any)
				ids, _ := job["id_tokens"].(map[string]any)
				tok, _ := ids["KEYGATE_TOKEN"].(map[string]any)
				if tok["aud"] != "keygate" {
					t.Errorf("id_tokens.KEYGATE_TOKEN.aud is %v, want keygate", tok["aud"])
				}
			}
			for _, want := range []string{"HTTPS_PROXY=", "http://token:", "SSL_CERT_FILE=", "GIT_SSL_CAINFO="} {
				if !strings.Contains(s, want) {
					t.Errorf("%s is not set", want)
				}
			}
			if !tc.mayUseSecrets && (strings.Contains(s, "secrets.") || strings.Contains(s, "AWS_SECRET_ACCESS_KEY=$")) {
				t.Error("the pipeline references a secret")
			}
		})
	}
}
