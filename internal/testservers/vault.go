package testservers

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/canarytest"
)

// VaultVersion must match scripts/vault.sh.
const VaultVersion = "v1.21.0"

// Vault is a real Vault server in dev mode on 127.0.0.1 (plain http, in
// memory storage, unsealed, secret/ mounted as KV v2), with a root token the
// test knows. Dev mode keeps nothing across Stop/Start: a restarted server
// is empty again (same address, same root token), so a fault test re-seeds
// what it needs after Start.
type Vault struct {
	Addr      string // http://127.0.0.1:PORT
	HostPort  string // 127.0.0.1:PORT
	RootToken string
	LogFile   string

	t    testing.TB
	bin  string
	home string
	mu   sync.Mutex
	cmd  *exec.Cmd
	done <-chan struct{}
}

// StartVault starts a dev-mode Vault and stops it when the test ends.
func StartVault(t testing.TB) *Vault {
	t.Helper()
	bin := binary(t, filepath.Join(cacheDir(), "vault-"+VaultVersion, "vault"), "vault.sh")
	dir := t.TempDir()
	v := &Vault{
		HostPort:  freeAddr(t),
		RootToken: canarytest.New("vault-root-token"),
		LogFile:   filepath.Join(dir, "vault.log"),
		t:         t,
		bin:       bin,
		home:      dir,
	}
	v.Addr = "http://" + v.HostPort
	v.Start()
	t.Cleanup(v.Stop)
	return v
}

// Start (re)starts the server and waits until it is unsealed and serving.
func (v *Vault) Start() {
	v.t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd != nil {
		return
	}
	cmd := exec.Command(v.bin, "server", "-dev",
		"-dev-listen-address="+v.HostPort,
		"-dev-root-token-id="+v.RootToken,
		"-dev-no-store-token")
	// The server gets no VAULT_* from the test's environment (tests set
	// some on purpose to prove the broker ignores them).
	env := []string{"HOME=" + v.home}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") && !strings.HasPrefix(kv, "HOME=") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	done := startLogged(v.t, "vault", cmd, v.LogFile)
	v.cmd, v.done = cmd, done
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil}}
	waitHTTP(v.t, "vault", client, v.Addr+"/v1/sys/health", done, v.LogFile)
}

// Stop kills the server; dev mode loses all its data.
func (v *Vault) Stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil {
		return
	}
	kill(v.cmd, v.done, v.HostPort)
	v.cmd = nil
}

// Do calls the Vault HTTP API as root (or with token, when given) and
// returns the status and decoded JSON body (nil when empty).
func (v *Vault) Do(method, path string, body any, token ...string) (int, map[string]any, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, v.Addr+"/v1/"+strings.TrimPrefix(path, "/"), rd)
	if err != nil {
		return 0, nil, err
	}
	tok := v.RootToken
	if len(token) > 0 {
		tok = token[0]
	}
	if tok != "" {
		req.Header.Set("X-Vault-Token", tok)
	}
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Proxy: nil}}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, err
	}
	var out map[string]any
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			return resp.StatusCode, nil, fmt.Errorf("vault %s %s: HTTP %d, body is not JSON", method, path, resp.StatusCode)
		}
	}
	return resp.StatusCode, out, nil
}

// Must is Do that fails the test on a transport error or a status >= 300.
func (v *Vault) Must(method, path string, body any) map[string]any {
	v.t.Helper()
	code, out, err := v.Do(method, path, body)
	if err != nil {
		v.t.Fatalf("vault %s %s: %v", method, path, err)
	}
	if code >= 300 {
		v.t.Fatalf("vault %s %s: HTTP %d: %v", method, path, code, out["errors"])
	}
	return out
}

// MustEventually retries Must until it succeeds or 10s pass (a new KV v2
// mount answers "upgrading" for a moment).
func (v *Vault) MustEventually(method, path string, body any) map[string]any {
	v.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, out, err := v.Do(method, path, body)
		if err == nil && code < 300 {
			return out
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("vault %s %s: HTTP %d: %v %v", method, path, code, err, out["errors"])
		}
		time.Sleep(100 * time.Millisecond)
	}
}
