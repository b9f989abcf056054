package attest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/keygate/broker/internal/broker"
)

// Test PKI for SPIFFE: a CA per trust domain (made with crypto/x509; go-spiffe's
// own test helpers live in internal packages), X509-SVID leaves with one
// URI SAN, and JWT authorities in a SPIFFE bundle (JWKS) file.

type spiffeCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newSPIFFECA(t *testing.T, td string) *spiffeCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: td + " test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &spiffeCA{td: spiffeid.RequireTrustDomainFromString(td), cert: cert, key: key}
}

// leaf issues an X509-SVID for id (a full spiffe:// URI) valid in
// [notBefore, notAfter].
func (ca *spiffeCA) leaf(t *testing.T, id string, notBefore, notAfter time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if id != "" {
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

type spiffeClock struct{ t time.Time }

func (c spiffeClock) Now() time.Time { return c.t }

// spiffeWorld is a file-mode SPIFFE attestor for example.org with a JWT
// authority (kid "k1") and the broker's own SVID.
type spiffeWorld struct {
	ca, foreign *spiffeCA
	jwtKey      *ecdsa.PrivateKey
	dir         string
	a           *SPIFFE
}

func newSPIFFEWorld(t *testing.T, clock broker.Clock) *spiffeWorld {
	t.Helper()
	w := &spiffeWorld{ca: newSPIFFECA(t, "example.org"), foreign: newSPIFFECA(t, "other.org"), dir: t.TempDir()}
	var err error
	if w.jwtKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	b := spiffebundle.New(w.ca.td)
	b.AddX509Authority(w.ca.cert)
	if err := b.AddJWTAuthority("k1", w.jwtKey.Public()); err != nil {
		t.Fatal(err)
	}
	js, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(w.dir, "bundle.json")
	if err := os.WriteFile(bundle, js, 0o600); err != nil {
		t.Fatal(err)
	}
	cert, key := w.ca.leaf(t, "spiffe://example.org/keygate", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	writePEM(t, filepath.Join(w.dir, "svid.pem"), "CERTIFICATE", cert.Raw)
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	writePEM(t, filepath.Join(w.dir, "svid.key"), "PRIVATE KEY", kder)
	w.a, err = NewSPIFFE(context.Background(), SPIFFEOptions{
		TrustDomain: "example.org", Bundle: bundle,
		SVIDCert: filepath.Join(w.dir, "svid.pem"), SVIDKey: filepath.Join(w.dir, "svid.key"),
		Clock: clock,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.a.Close() })
	return w
}

// jwt signs claims with key under kid.
func signJWTSVID(t *testing.T, key any, alg jose.SignatureAlgorithm, kid string, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), kid))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func svidClaims(sub string, aud any, exp time.Time) map[string]any {
	return map[string]any{"sub": sub, "aud": aud, "exp": exp.Unix(), "iat": time.Now().Unix()}
}

func tlsEvidence(certs ...*x509.Certificate) broker.Evidence {
	return broker.Evidence{Listener: "proxy_tls", TLS: &tls.ConnectionState{PeerCertificates: certs}}
}

func bearerEvidence(tok string) broker.Evidence {
	return broker.Evidence{Listener: "proxy", ProxyAuthorization: broker.NewSecret("Bearer " + tok)}
}

// expectRejected checks an error wraps ErrInvalidEvidence, carries the
// reason and none of the secret strings.
func expectRejected(t *testing.T, err error, reason string, secrets ...string) {
	t.Helper()
	if !errors.Is(err, broker.ErrInvalidEvidence) {
		t.Fatalf("err = %v, want ErrInvalidEvidence", err)
	}
	if !strings.Contains(err.Error(), reason) {
		t.Errorf("err = %q, want reason %q", err, reason)
	}
	for _, s := range secrets {
		for _, part := range strings.Split(s, ".") {
			if len(part) > 8 && strings.Contains(err.Error(), part) {
				t.Errorf("error %q contains token material", err)
			}
		}
	}
}

func TestSPIFFEX509(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	now := time.Now()
	good, _ := w.ca.leaf(t, "spiffe://example.org/ns/a/sa/one", now.Add(-time.Minute), now.Add(time.Hour))
	id, err := w.a.Attest(context.Background(), tlsEvidence(good))
	if err != nil {
		t.Fatal(err)
	}
	if id.ID != "spiffe://example.org/ns/a/sa/one" || id.Method != broker.MethodSPIFFEX509 || id.TrustDomain != "example.org" {
		t.Errorf("identity = %+v", id)
	}
	if !id.Expires.Equal(good.NotAfter) {
		t.Errorf("identity expires %v, want the SVID's NotAfter %v", id.Expires, good.NotAfter)
	}

	foreign, _ := w.foreign.leaf(t, "spiffe://other.org/w", now.Add(-time.Minute), now.Add(time.Hour))
	_, err = w.a.Attest(context.Background(), tlsEvidence(foreign))
	expectRejected(t, err, "not in the trust domain")

	// Claims our trust domain, signed by another CA (e.g. a rotated-out or
	// foreign authority).
	forged, _ := w.foreign.leaf(t, "spiffe://example.org/w", now.Add(-time.Minute), now.Add(time.Hour))
	_, err = w.a.Attest(context.Background(), tlsEvidence(forged))
	expectRejected(t, err, "does not verify")

	expired, _ := w.ca.leaf(t, "spiffe://example.org/old", now.Add(-2*time.Hour), now.Add(-time.Hour))
	_, err = w.a.Attest(context.Background(), tlsEvidence(expired))
	expectRejected(t, err, "does not verify")

	noID, _ := w.ca.leaf(t, "", now.Add(-time.Minute), now.Add(time.Hour))
	_, err = w.a.Attest(context.Background(), tlsEvidence(noID))
	expectRejected(t, err, "no valid SPIFFE ID")

	// No TLS, or TLS without a client certificate and no token: not ours.
	for _, ev := range []broker.Evidence{{Listener: "proxy"}, tlsEvidence()} {
		if _, err := w.a.Attest(context.Background(), ev); !errors.Is(err, broker.ErrNoEvidence) {
			t.Errorf("no evidence: err = %v, want ErrNoEvidence", err)
		}
	}
}

func TestSPIFFEX509ExpiresOnClock(t *testing.T) {
	now := time.Now()
	w := newSPIFFEWorld(t, spiffeClock{now.Add(2 * time.Hour)})
	leaf, _ := w.ca.leaf(t, "spiffe://example.org/w", now.Add(-time.Minute), now.Add(time.Hour))
	_, err := w.a.Attest(context.Background(), tlsEvidence(leaf))
	expectRejected(t, err, "does not verify")
	// The broker's own SVID has expired too: fail closed.
	if w.a.Ready() {
		t.Error("Ready with an expired own SVID")
	}
	if _, err := w.a.GetX509SVID(); err == nil {
		t.Error("GetX509SVID returned an expired SVID")
	}
}

func TestSPIFFEJWT(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	ctx := context.Background()
	now := time.Now()
	sub := "spiffe://example.org/ns/ci/sa/builder"

	tok := signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims(sub, []string{"keygate"}, now.Add(5*time.Minute)))
	id, err := w.a.Attest(ctx, bearerEvidence(tok))
	if err != nil {
		t.Fatal(err)
	}
	if id.ID != sub || id.Method != broker.MethodSPIFFEJWT || id.TrustDomain != "example.org" || id.Claims["sub"] != sub {
		t.Errorf("identity = %+v", id)
	}
	if d := id.Expires.Sub(now.Add(5 * time.Minute)); d > time.Second || d < -time.Second {
		t.Errorf("identity expires %v, want the token's exp", id.Expires)
	}
	// The password of a proxy URL works too.
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte("token:"+tok))
	if id, err := w.a.Attest(ctx, broker.Evidence{ProxyAuthorization: broker.NewSecret(basic)}); err != nil || id.ID != sub {
		t.Errorf("basic: %+v, %v", id, err)
	}

	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rejected := []struct {
		name, tok, reason string
	}{
		{"expired", signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims(sub, "keygate", now.Add(-10*time.Minute))), "expired"},
		{"wrong audience", signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims(sub, "someone-else", now.Add(5*time.Minute))), "audience"},
		{"foreign trust domain", signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims("spiffe://other.org/w", "keygate", now.Add(5*time.Minute))), "not in the trust domain"},
		{"bad signature", signJWTSVID(t, other, jose.ES256, "k1", svidClaims(sub, "keygate", now.Add(5*time.Minute))), "signature"},
		{"unknown kid", signJWTSVID(t, other, jose.ES256, "k9", svidClaims(sub, "keygate", now.Add(5*time.Minute))), "signature"},
		{"hmac", signJWTSVID(t, []byte("0123456789abcdef0123456789abcdef"), jose.HS256, "k1", svidClaims(sub, "keygate", now.Add(5*time.Minute))), "malformed"},
		{"no exp", signJWTSVID(t, w.jwtKey, jose.ES256, "k1", map[string]any{"sub": sub, "aud": "keygate"}), "malformed"},
		{"not yet valid", signJWTSVID(t, w.jwtKey, jose.ES256, "k1", map[string]any{"sub": sub, "aud": "keygate", "exp": now.Add(time.Hour).Unix(), "nbf": now.Add(30 * time.Minute).Unix()}), "not yet valid"},
	}
	for _, tc := range rejected {
		t.Run(tc.name, func(t *testing.T) {
			_, err := w.a.Attest(ctx, bearerEvidence(tc.tok))
			expectRejected(t, err, tc.reason, tc.tok)
		})
	}

	// Not a JWT-SVID at all: the next attestor (oidc) may take it.
	for name, tok := range map[string]string{
		"garbage":        "not-a-jwt",
		"three parts":    "aaa.bbb.ccc",
		"oidc subject":   signJWTSVID(t, other, jose.ES256, "x", map[string]any{"sub": "repo:acme/app:ref:refs/heads/main", "iss": "https://issuer.example", "aud": "keygate", "exp": now.Add(time.Hour).Unix()}),
		"no sub":         signJWTSVID(t, other, jose.ES256, "x", map[string]any{"aud": "keygate", "exp": now.Add(time.Hour).Unix()}),
		"https subject":  signJWTSVID(t, other, jose.ES256, "x", map[string]any{"sub": "https://example.org/w", "exp": now.Add(time.Hour).Unix()}),
		"empty spiffeid": signJWTSVID(t, other, jose.ES256, "x", map[string]any{"sub": "spiffe://", "exp": now.Add(time.Hour).Unix()}),
	} {
		if _, err := w.a.Attest(ctx, bearerEvidence(tok)); !errors.Is(err, broker.ErrNoEvidence) {
			t.Errorf("%s: err = %v, want ErrNoEvidence", name, err)
		}
	}
	// A garbled header is rejected, as by every token attestor.
	if _, err := w.a.Attest(ctx, broker.Evidence{ProxyAuthorization: broker.NewSecret("Bearer")}); !errors.Is(err, broker.ErrInvalidEvidence) {
		t.Errorf("garbled: err = %v", err)
	}
	big := strings.Repeat("a", maxTokenBytes+1)
	_, err = w.a.Attest(ctx, bearerEvidence(big))
	expectRejected(t, err, "too large")
}

func TestSPIFFEJWTConfiguredAudience(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	a, err := NewSPIFFE(context.Background(), SPIFFEOptions{
		TrustDomain: "example.org", Bundle: filepath.Join(w.dir, "bundle.json"), Audiences: []string{"a1", "a2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	exp := time.Now().Add(time.Minute)
	ok := signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims("spiffe://example.org/w", []string{"x", "a2"}, exp))
	if _, err := a.Attest(context.Background(), bearerEvidence(ok)); err != nil {
		t.Errorf("audience a2: %v", err)
	}
	def := signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims("spiffe://example.org/w", "keygate", exp))
	_, err = a.Attest(context.Background(), bearerEvidence(def))
	expectRejected(t, err, "audience", def)
}

func TestSPIFFEPEMBundleHasNoJWTAuthorities(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	pemPath := filepath.Join(w.dir, "bundle.pem")
	writePEM(t, pemPath, "CERTIFICATE", w.ca.cert.Raw)
	a, err := NewSPIFFE(context.Background(), SPIFFEOptions{TrustDomain: "example.org", Bundle: pemPath})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	leaf, _ := w.ca.leaf(t, "spiffe://example.org/w", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if id, err := a.Attest(context.Background(), tlsEvidence(leaf)); err != nil || id.ID != "spiffe://example.org/w" {
		t.Errorf("x509 with PEM bundle: %+v, %v", id, err)
	}
	tok := signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims("spiffe://example.org/w", "keygate", time.Now().Add(time.Minute)))
	_, err = a.Attest(context.Background(), bearerEvidence(tok))
	expectRejected(t, err, "no JWT authorities", tok)
	if _, err := a.GetX509SVID(); err == nil {
		t.Error("GetX509SVID without svid files succeeded")
	}
}

func TestSPIFFEOptions(t *testing.T) {
	ctx := context.Background()
	for name, o := range map[string]SPIFFEOptions{
		"bad trust domain":  {TrustDomain: "spiffe://example.org/x", Bundle: BundleWorkloadAPI, Socket: "unix:///nonexistent"},
		"no bundle":         {TrustDomain: "example.org"},
		"svid with api":     {TrustDomain: "example.org", Bundle: BundleWorkloadAPI, Socket: "/x", SVIDCert: "a", SVIDKey: "b"},
		"missing file":      {TrustDomain: "example.org", Bundle: "/nonexistent/bundle.pem"},
		"bad socket scheme": {TrustDomain: "example.org", Bundle: BundleWorkloadAPI, Socket: "http://x"},
	} {
		if a, err := NewSPIFFE(ctx, o); err == nil {
			a.Close()
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestSPIFFEWorkloadAPIAbsent: the broker starts without a Workload API;
// until it answers, readiness is false, handshakes fail and SPIFFE evidence
// is denied as unavailable (not as a bad caller).
func TestSPIFFEWorkloadAPIAbsent(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	sock := filepath.Join(t.TempDir(), "absent.sock")
	start := time.Now()
	a, err := NewSPIFFE(context.Background(), SPIFFEOptions{TrustDomain: "example.org", Bundle: BundleWorkloadAPI, Socket: sock})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("NewSPIFFE blocked for %v", d)
	}
	if a.Ready() {
		t.Error("ready without a Workload API")
	}
	if _, err := a.GetX509SVID(); !errors.Is(err, ErrSPIFFEUnavailable) {
		t.Errorf("GetX509SVID: %v", err)
	}
	leaf, _ := w.ca.leaf(t, "spiffe://example.org/w", time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	if _, err := a.Attest(context.Background(), tlsEvidence(leaf)); !errors.Is(err, ErrSPIFFEUnavailable) || errors.Is(err, broker.ErrInvalidEvidence) {
		t.Errorf("x509 while unavailable: %v", err)
	}
	tok := signJWTSVID(t, w.jwtKey, jose.ES256, "k1", svidClaims("spiffe://example.org/w", "keygate", time.Now().Add(time.Minute)))
	if _, err := a.Attest(context.Background(), bearerEvidence(tok)); !errors.Is(err, ErrSPIFFEUnavailable) {
		t.Errorf("jwt while unavailable: %v", err)
	}
	if err := handshake(t, a, nil); err == nil {
		t.Error("TLS handshake succeeded without an SVID")
	}
	done := make(chan struct{})
	go func() { _ = a.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked")
	}
}

// TestSPIFFEServerTLS: the proxy_tls configuration presents the broker's
// SVID and admits only clients with an X509-SVID of the trust domain.
func TestSPIFFEServerTLS(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	now := time.Now()
	mk := func(ca *spiffeCA, id string) *tls.Certificate {
		c, k := ca.leaf(t, id, now.Add(-time.Minute), now.Add(time.Hour))
		return &tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: k, Leaf: c}
	}
	if err := handshake(t, w.a, mk(w.ca, "spiffe://example.org/client")); err != nil {
		t.Errorf("member of the trust domain refused: %v", err)
	}
	if err := handshake(t, w.a, nil); err == nil {
		t.Error("client without a certificate admitted")
	}
	if err := handshake(t, w.a, mk(w.foreign, "spiffe://other.org/client")); err == nil {
		t.Error("client of a foreign trust domain admitted")
	}
	if err := handshake(t, w.a, mk(w.foreign, "spiffe://example.org/client")); err == nil {
		t.Error("client signed by a foreign CA admitted")
	}
}

// handshake runs a TLS handshake against s.ServerTLSConfig over a pipe. The
// client trusts the test CA and checks the server's SPIFFE ID loosely.
func handshake(t *testing.T, s *SPIFFE, cert *tls.Certificate) error {
	t.Helper()
	cc, sc := net.Pipe()
	defer cc.Close()
	defer sc.Close()
	srv := tls.Server(sc, s.ServerTLSConfig())
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake(); _ = sc.Close() }()
	cfg := &tls.Config{InsecureSkipVerify: true} // the server's SVID is not under test here
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	cli := tls.Client(cc, cfg)
	_ = cli.SetDeadline(time.Now().Add(5 * time.Second))
	cerr := cli.Handshake()
	if cerr == nil {
		// TLS 1.3: the server's verdict on the client certificate arrives
		// after the client's handshake completes; read to see it.
		_, cerr = cli.Read(make([]byte, 1))
		if errors.Is(cerr, os.ErrDeadlineExceeded) {
			cerr = nil
		}
	}
	serr := <-errc
	if serr != nil {
		return serr
	}
	if cerr != nil && !errors.Is(cerr, net.ErrClosed) && cerr.Error() != "EOF" {
		return cerr
	}
	return nil
}
