package testservers

import (
	"strings"
	"testing"
)

// The helpers themselves: each server starts, answers, stops and starts
// again.

func TestVaultDevServer(t *testing.T) {
	v := StartVault(t)
	v.MustEventually("POST", "secret/data/probe", map[string]any{"data": map[string]any{"k": "v"}})
	got := v.Must("GET", "secret/data/probe", nil)
	if d := got["data"].(map[string]any)["data"].(map[string]any); d["k"] != "v" {
		t.Fatalf("read back %v", d)
	}
	if code, _, _ := v.Do("GET", "secret/data/probe", nil, "not-a-token"); code != 403 {
		t.Fatalf("bad token: HTTP %d, want 403", code)
	}
	v.Stop()
	if _, _, err := v.Do("GET", "sys/health", nil); err == nil {
		t.Fatal("vault still answers after Stop")
	}
	v.Start()
	// Dev mode: a restarted server is empty, with the same root token.
	if code, _, err := v.Do("GET", "secret/data/probe", nil); err != nil || code != 404 {
		t.Fatalf("after restart: HTTP %d, %v; want 404", code, err)
	}
}

func TestPostgresCluster(t *testing.T) {
	p := StartPostgres(t)
	out, err := p.PSQL(p.User, p.Password, "SELECT current_user")
	if err != nil || out != "postgres" {
		t.Fatalf("psql: %q, %v", out, err)
	}
	if _, err := p.PSQL(p.User, "wrong-password", "SELECT 1"); err == nil || !strings.Contains(err.Error(), "password authentication failed") {
		t.Fatalf("wrong password: %v", err)
	}
	p.Stop()
	if _, err := p.PSQL(p.User, p.Password, "SELECT 1"); err == nil {
		t.Fatal("postgres still answers after Stop")
	}
	p.Start()
	if _, err := p.PSQL(p.User, p.Password, "SELECT 1"); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}
