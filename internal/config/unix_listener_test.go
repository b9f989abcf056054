package config

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

// listen.proxy on a Unix socket, with the process attestor reading the
// caller's SO_PEERCRED: the workload is this test process itself.
func TestUnixSocketProxyWithProcessAttestor(t *testing.T) {
	if os.Getuid() != 0 {
		testservers.Missing(t, "the process attestor reads other processes' /proc entries; run as root")
	}
	// The upstream records what it received (an echo would be scrubbed by
	// the broker before the client saw it).
	seen := make(chan string, 1)
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- strings.Join(r.Header.Values("Authorization"), "|")
		_, _ = io.WriteString(w, "ok")
	}))
	defer up.Close()
	dir := t.TempDir()
	writeCertPEM(t, dir, "upstream.pem", up.Certificate())
	writeFile(t, dir, "token", "unix-canary-token\n", 0o600)
	port := portOf(t, up.URL)
	path := writeFile(t, dir, "c.yaml", fmt.Sprintf(`listen: {proxy: "unix:proxy.sock"}
ca: {ephemeral: true, cert_out: ca.pem}
attestors: [{type: process}]
egress: {allow_cidrs: [127.0.0.1/32], ca_bundle: upstream.pem}
credentials:
  tok: {source: static, value: "file:token"}
rules:
  - name: this-process
    hosts: ["127.0.0.1"]
    ports: [%s]
    when: 'workload.method == "process" && workload.process.pid == %d'
    inject: {credential: tok, as: bearer}
`, port, os.Getpid()), 0o644)
	s := start(t, path)

	sock := filepath.Join(dir, "proxy.sock")
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o666 {
		t.Fatalf("socket %s: %v %v", sock, fi, err)
	}
	pool := x509.NewCertPool()
	pemBytes, _ := os.ReadFile(s.rt.CACertPath)
	pool.AppendCertsFromPEM(pemBytes)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: "keygate.sock"}),
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		TLSClientConfig: &tls.Config{RootCAs: pool},
	}}
	resp, err := client.Get(up.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	var auth string
	select {
	case auth = <-seen:
	default:
	}
	if resp.StatusCode != http.StatusOK || auth != "Bearer unix-canary-token" {
		t.Fatalf("status %d, upstream saw Authorization %q", resp.StatusCode, auth)
	}
	mustNotContain(t, "logs", s.logs.String(), "unix-canary-token")
	if !strings.Contains(s.logs.String(), `"workload.method":"process"`) {
		t.Fatal("the audit line does not name the process identity")
	}
}
