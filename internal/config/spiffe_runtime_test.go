package config

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// testSVIDs is a trust domain CA and a way to issue X509-SVIDs from it.
type testSVIDs struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestSVIDs(t *testing.T, td string) *testSVIDs {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testSVIDs{cert: cert, key: key}
}

// issue returns PEM cert and key for id.
func (c *testSVIDs) issue(t *testing.T, id string) (string, string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(id)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}))
}

// TestRuntimeProxyTLS: listen.proxy_tls with a file-mode spiffe attestor.
// A client with an X509-SVID of the trust domain is attested as that SPIFFE
// ID and gets its rule's credential; the broker presents its own SVID; a
// client without a certificate, or from another trust domain, is refused at
// the handshake.
func TestRuntimeProxyTLS(t *testing.T) {
	var up upstreamLog
	srv := httptest.NewServer(up.handler())
	defer srv.Close()

	dir := t.TempDir()
	ca := newTestSVIDs(t, "example.org")
	writeCertPEM(t, dir, "bundle.pem", ca.cert)
	bc, bk := ca.issue(t, "spiffe://example.org/keygate")
	writeFile(t, dir, "svid.pem", bc, 0o644)
	writeFile(t, dir, "svid.key", bk, 0o600)
	writeFile(t, dir, "token", "TOKEN-FOR-ONE", 0o600)
	path := writeFile(t, dir, "c.yaml", fmt.Sprintf(`listen: {proxy: 127.0.0.1:0, proxy_tls: 127.0.0.1:0, admin: 127.0.0.1:0}
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - {type: spiffe, trust_domain: example.org, bundle: bundle.pem, svid: {cert: svid.pem, key: svid.key}}
egress: {allow_cidrs: [127.0.0.1/32]}
credentials:
  one: {source: static, value: file:token}
rules:
  - name: one
    hosts: [127.0.0.1]
    ports: [%s]
    when: 'workload.method == "spiffe-x509" && workload.id == "spiffe://example.org/one"'
    allow_plaintext: true
    inject: {credential: one, as: bearer}
`, portOf(t, srv.URL)), 0o644)
	s := start(t, path)
	if s.rt.ProxyTLSAddr == nil {
		t.Fatal("no proxy_tls address")
	}
	if code, _ := s.admin(t, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz = %d", code)
	}

	bundle := x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("example.org"), []*x509.Certificate{ca.cert})
	self := spiffeid.RequireFromString("spiffe://example.org/keygate")
	get := func(t *testing.T, svid *x509svid.SVID, path string) (*http.Response, error) {
		t.Helper()
		var cfg *tls.Config
		if svid != nil {
			cfg = tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(self))
		} else {
			cfg = tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(self))
		}
		conn, err := tls.Dial("tcp", s.rt.ProxyTLSAddr.String(), cfg)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", srv.URL, path, srv.Listener.Addr())
		return http.ReadResponse(bufio.NewReader(conn), nil)
	}
	parse := func(certPEM, keyPEM string) *x509svid.SVID {
		sv, err := x509svid.Parse([]byte(certPEM), []byte(keyPEM))
		if err != nil {
			t.Fatal(err)
		}
		return sv
	}

	resp, err := get(t, parse(ca.issue(t, "spiffe://example.org/one")), "/one")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	if got := up.last(t, "/one").Header.Get("Authorization"); got != "Bearer TOKEN-FOR-ONE" {
		t.Errorf("upstream Authorization is not the rule's credential")
	}
	if !strings.Contains(s.logs.String(), `"workload.method":"spiffe-x509"`) || !strings.Contains(s.logs.String(), `"listener":"proxy_tls"`) {
		t.Errorf("audit line does not show spiffe-x509 on proxy_tls:\n%s", s.logs.String())
	}

	// Another member of the trust domain: attested, but no rule for it.
	resp, err = get(t, parse(ca.issue(t, "spiffe://example.org/two")), "/two")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || up.count("/two") != 0 {
		t.Errorf("workload two: status %d, upstream saw %d", resp.StatusCode, up.count("/two"))
	}

	// No client certificate, and a foreign trust domain: refused at the
	// handshake (TLS 1.3 reports it on the first read).
	other := newTestSVIDs(t, "other.org")
	for name, sv := range map[string]*x509svid.SVID{"no certificate": nil, "foreign": parse(other.issue(t, "spiffe://other.org/one"))} {
		if resp, err := get(t, sv, "/refused"); err == nil {
			resp.Body.Close()
			t.Errorf("%s: admitted, status %d", name, resp.StatusCode)
		}
	}
	if up.count("/refused") != 0 {
		t.Error("a refused client reached the upstream")
	}
}
