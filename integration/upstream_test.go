package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The upstream PKI: a test CA (not the broker's) that signs one leaf for
// every upstream. The broker trusts it through egress.ca_bundle; clients
// never see it, they only trust the broker's MITM CA.
var (
	upstreamBundle string // PEM file of the test CA
	upstreamLeaf   tls.Certificate
)

func initTestPKI(dir string) error {
	caCert, caKey, caDER, err := newCA("keygate e2e upstream CA")
	if err != nil {
		return err
	}
	now := time.Now()
	upstreamLeaf, err = signLeaf(caCert, caKey, 2, "keygate e2e upstream",
		[]string{"localhost", "allowed.test", "evil.test"}, []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("127.0.0.2")},
		now.Add(-time.Hour), now.Add(24*time.Hour), false)
	if err != nil {
		return err
	}
	upstreamBundle = filepath.Join(dir, "upstream-ca.pem")
	return os.WriteFile(upstreamBundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
}

// newCA makes a self-signed ECDSA P-256 CA named cn, valid from an hour
// ago for a day; der is its certificate.
func newCA(cn string) (cert *x509.Certificate, key *ecdsa.PrivateKey, der []byte, err error) {
	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err = x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err = x509.ParseCertificate(der)
	return cert, key, der, err
}

// signLeaf makes a server certificate (a fresh P-256 key) named cn for
// dns and ips, valid from nb to na, signed by ca's key or, when
// selfSigned, by its own.
func signLeaf(ca *x509.Certificate, caKey *ecdsa.PrivateKey, serial int64, cn string, dns []string, ips []net.IP, nb, na time.Time, selfSigned bool) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    nb,
		NotAfter:     na,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	parent, signer := ca, caKey
	if selfSigned {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		parent, signer = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// seenRequest is what an upstream recorded about one request.
type seenRequest struct {
	Method, Path, Host string
	Auth               []string // every Authorization value, in order
	Header             http.Header
}

// upstream is a TLS server that records every request and connection.
type upstream struct {
	name  string
	srv   *httptest.Server
	conns atomic.Int64

	mu   sync.Mutex
	reqs []seenRequest
}

// newUpstream starts a recording TLS server on 127.0.0.1. next answers the
// request after it is recorded; nil answers 200 "hello from NAME".
func newUpstream(t *testing.T, name string, next http.Handler) *upstream {
	t.Helper()
	return upstreamAt(t, name, "", false, next)
}

// upstreamAt is newUpstream listening on addr ("" for 127.0.0.1, any
// port), over TLS or, when plain, over HTTP.
func upstreamAt(t *testing.T, name, addr string, plain bool, next http.Handler) *upstream {
	t.Helper()
	if next == nil {
		next = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintf(w, "hello from %s\n", name)
		})
	}
	cert := &upstreamLeaf
	if plain {
		cert = nil
	}
	return serveUpstream(t, name, addr, cert, nil, next)
}

// serveUpstream starts the recording server behind upstreamAt and
// certUpstream: on addr ("" for 127.0.0.1, any port), over TLS with cert
// or, when cert is nil, over HTTP; errLog, when set, takes the server's
// own log (refused handshakes). next answers each request after it is
// recorded.
func serveUpstream(t *testing.T, name, addr string, cert *tls.Certificate, errLog *log.Logger, next http.Handler) *upstream {
	t.Helper()
	u := &upstream{name: name}
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.reqs = append(u.reqs, seenRequest{
			Method: r.Method, Path: r.URL.Path, Host: r.Host,
			Auth:   append([]string(nil), r.Header.Values("Authorization")...),
			Header: r.Header.Clone(),
		})
		u.mu.Unlock()
		next.ServeHTTP(w, r)
	}))
	if addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("listen %s: %v", addr, err)
		}
		u.srv.Listener.Close()
		u.srv.Listener = ln
	}
	u.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			u.conns.Add(1)
		}
	}
	u.srv.Config.ReadHeaderTimeout = testTimeout
	if errLog != nil {
		u.srv.Config.ErrorLog = errLog
	}
	if cert == nil {
		u.srv.Start()
	} else {
		u.srv.TLS = &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12}
		u.srv.StartTLS()
	}
	t.Cleanup(u.srv.Close)
	return u
}

// port is the upstream's TCP port.
func (u *upstream) port() int {
	_, p, _ := net.SplitHostPort(u.srv.Listener.Addr().String())
	n, _ := strconv.Atoi(p)
	return n
}

func (u *upstream) requests() []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenRequest(nil), u.reqs...)
}

func (u *upstream) count() int { return len(u.requests()) }

// expectInjected asserts that the upstream received exactly n requests and
// that each carried exactly one Authorization header equal to want.
func (u *upstream) expectInjected(t *testing.T, n int, want string) {
	t.Helper()
	reqs := u.requests()
	if len(reqs) != n {
		t.Errorf("%s upstream received %d requests, want %d", u.name, len(reqs), n)
	}
	for i, r := range reqs {
		if len(r.Auth) != 1 || r.Auth[0] != want {
			t.Errorf("%s upstream request %d (%s %s): Authorization = %s, want exactly one equal to the injected value",
				u.name, i, r.Method, r.Path, describeAuth(r.Auth, want))
		}
	}
}

// expectNone asserts the upstream received no request and, when strict,
// not even a TCP connection.
func (u *upstream) expectNone(t *testing.T, strict bool) {
	t.Helper()
	if n := u.count(); n != 0 {
		t.Errorf("%s upstream received %d requests, want 0", u.name, n)
	}
	if c := u.conns.Load(); strict && c != 0 {
		t.Errorf("%s upstream accepted %d connections, want 0", u.name, c)
	}
}

// describeAuth shows Authorization values without printing the secret.
func describeAuth(vals []string, injected string) string {
	out := fmt.Sprintf("%d value(s):", len(vals))
	for _, v := range vals {
		if v == injected {
			out += " [the injected value]"
		} else {
			out += fmt.Sprintf(" %q", redactCanary(v))
		}
	}
	return out
}

// canaryListener is a raw TCP listener that only counts connections: the
// SSRF target no request may ever reach.
type canaryListener struct {
	ln    net.Listener
	conns atomic.Int64
}

func newCanaryListener(t *testing.T, ip string) *canaryListener {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatalf("canary listener on %s: %v", ip, err)
	}
	c := &canaryListener{ln: ln}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.conns.Add(1)
			_ = conn.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return c
}

func (c *canaryListener) port() int { return c.ln.Addr().(*net.TCPAddr).Port }
