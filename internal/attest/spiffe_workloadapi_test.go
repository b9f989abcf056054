package attest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/keygate/broker/internal/broker"
)

// T-F1 against a fake Workload API (spiffe_fakewl_test.go): the attestor in
// workload_api mode with the Workload API absent at start, SVID rotation,
// the Workload API lost after start, and trust bundle rotation.

const (
	wlTD        = "example.org"
	wlBrokerID  = "spiffe://example.org/keygate"
	wlClientID  = "spiffe://example.org/workload"
	wlReadyWait = 10 * time.Second // N: Workload API up → Ready
)

// wlEnv is a fake Workload API serving example.org material: a CA, the
// broker's SVID from it, and a JWT authority "k1".
type wlEnv struct {
	sock   string
	fake   *fakeWorkloadAPI
	ca     *wlCA
	jwtKey *ecdsa.PrivateKey
	td     spiffeid.TrustDomain
}

func newWLEnv(tb testing.TB) *wlEnv {
	tb.Helper()
	// t.TempDir paths can exceed the 108-byte sun_path limit for long test
	// names; keep the socket short.
	dir, err := os.MkdirTemp("", "kgwl")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	e := &wlEnv{sock: filepath.Join(dir, "agent.sock"), ca: newWLCA(tb, wlTD, "CA1"), td: spiffeid.RequireTrustDomainFromString(wlTD)}
	if e.jwtKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		tb.Fatal(err)
	}
	e.fake = newFakeWorkloadAPI(tb, e.sock)
	return e
}

// serveBrokerSVID pushes a broker SVID from ca valid until notAfter, with
// bundle as the X.509 authorities; it returns the SVID leaf.
func (e *wlEnv) serveBrokerSVID(tb testing.TB, ca *wlCA, notAfter time.Time, bundle ...*wlCA) *x509.Certificate {
	tb.Helper()
	cert, key := ca.issue(tb, wlBrokerID, time.Now().Add(-time.Minute), notAfter)
	var auth []*x509.Certificate
	for _, b := range bundle {
		auth = append(auth, b.cert)
	}
	e.fake.setX509(wlBrokerID, []*x509.Certificate{cert}, key, auth)
	return cert
}

func (e *wlEnv) serveJWT(tb testing.TB, kid string, key *ecdsa.PrivateKey) {
	tb.Helper()
	b := jwtbundle.New(e.td)
	if err := b.AddJWTAuthority(kid, key.Public()); err != nil {
		tb.Fatal(err)
	}
	e.fake.setJWTBundle(b)
}

// fullStart serves a one-hour broker SVID and the JWT bundle, then listens.
func (e *wlEnv) fullStart(tb testing.TB) *x509.Certificate {
	tb.Helper()
	cert := e.serveBrokerSVID(tb, e.ca, time.Now().Add(time.Hour), e.ca)
	e.serveJWT(tb, "k1", e.jwtKey)
	e.fake.start()
	return cert
}

func (e *wlEnv) attestor(tb testing.TB, clock broker.Clock) *SPIFFE {
	tb.Helper()
	a, err := NewSPIFFE(context.Background(), SPIFFEOptions{TrustDomain: wlTD, Bundle: BundleWorkloadAPI, Socket: e.sock, Clock: clock})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = a.Close() })
	return a
}

func waitReady(tb testing.TB, a *SPIFFE) time.Duration {
	tb.Helper()
	d, ok := waitUntil(wlReadyWait, a.Ready)
	if !ok {
		tb.Fatalf("not ready %v after the Workload API came up", wlReadyWait)
	}
	return d
}

// clientCert is a workload X509-SVID from ca for the TLS client.
func clientCert(tb testing.TB, ca *wlCA, id string) *tls.Certificate {
	tb.Helper()
	c, k := ca.issue(tb, id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	return &tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: k, Leaf: c}
}

// mtls runs a real TLS handshake (loopback TCP) as a client presenting
// cert against s.ServerTLSConfig and returns the server's certificate.
func mtls(t *testing.T, s *SPIFFE, cert *tls.Certificate) (*x509.Certificate, error) {
	t.Helper()
	return mtlsWithConfig(t, s.ServerTLSConfig(), cert)
}

// mtlsWithConfig is mtls against a given server config.
func mtlsWithConfig(t *testing.T, scfg *tls.Config, cert *tls.Certificate) (*x509.Certificate, error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	errc := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			errc <- err
			return
		}
		srv := tls.Server(c, scfg)
		_ = srv.SetDeadline(time.Now().Add(5 * time.Second))
		err = srv.Handshake()
		if err == nil {
			_, err = srv.Write([]byte{1}) // tells the client the server accepted it
		}
		_ = srv.Close()
		errc <- err
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} // the serial is checked instead
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	cli := tls.Client(c, cfg)
	_ = cli.SetDeadline(time.Now().Add(5 * time.Second))
	cerr := cli.Handshake()
	if cerr == nil {
		_, cerr = cli.Read(make([]byte, 1)) // TLS 1.3: the client-cert verdict comes after
	}
	if serr := <-errc; serr != nil {
		return nil, serr
	}
	if cerr != nil {
		return nil, cerr
	}
	if pc := cli.ConnectionState().PeerCertificates; len(pc) > 0 {
		return pc[0], nil
	}
	return nil, errNoServerCert
}

func sameCert(a, b *x509.Certificate) bool {
	return a != nil && b != nil && a.SerialNumber.Cmp(b.SerialNumber) == 0
}

// TestFakeWorkloadAPIRequiresHeader: the fake refuses requests without the
// workload.spiffe.io metadata, and go-spiffe's client always sends it.
func TestFakeWorkloadAPIRequiresHeader(t *testing.T) {
	e := newWLEnv(t)
	e.fullStart(t)
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cl := workload.NewSpiffeWorkloadAPIClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	st, err := cl.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = st.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("without metadata: %v, want InvalidArgument", err)
	}
	st, err = cl.FetchX509SVID(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || len(r.Svids) != 1 || r.Svids[0].SpiffeId != wlBrokerID {
		t.Fatalf("with metadata: %v %v", r, err)
	}
	e.fake.badHeader.Store(0)

	a := e.attestor(t, nil)
	waitReady(t, a)
	if n := e.fake.badHeader.Load(); n != 0 {
		t.Errorf("go-spiffe sent %d requests without the security header", n)
	}
}

// TestSPIFFEWorkloadAPIAbsentThenUp (T-F1 a): no socket at start → not
// ready, SPIFFE evidence denied as unavailable; the Workload API comes up
// on that socket → ready within N s and workload SVIDs attest.
func TestSPIFFEWorkloadAPIAbsentThenUp(t *testing.T) {
	e := newWLEnv(t)
	start := time.Now()
	a := e.attestor(t, nil)
	if d := time.Since(start); d > time.Second {
		t.Errorf("NewSPIFFE blocked %v", d)
	}
	leaf, _ := e.ca.issue(t, wlClientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	tok := signJWTSVID(t, e.jwtKey, jose.ES256, "k1", svidClaims(wlClientID, "keygate", time.Now().Add(time.Minute)))
	client := clientCert(t, e.ca, wlClientID)

	// Absent for a while: never ready, everything denied as unavailable
	// (not as a bad caller), handshakes fail.
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		if a.Ready() {
			t.Fatal("ready without a Workload API")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := a.Attest(context.Background(), tlsEvidence(leaf)); !errors.Is(err, ErrSPIFFEUnavailable) || errors.Is(err, broker.ErrInvalidEvidence) {
		t.Errorf("x509 while absent: %v", err)
	}
	if _, err := a.Attest(context.Background(), bearerEvidence(tok)); !errors.Is(err, ErrSPIFFEUnavailable) || errors.Is(err, broker.ErrInvalidEvidence) {
		t.Errorf("jwt while absent: %v", err)
	}
	if _, err := mtls(t, a, client); err == nil {
		t.Error("handshake succeeded while absent")
	}

	brokerCert := e.fullStart(t)
	d := waitReady(t, a)
	t.Logf("ready %v after the Workload API came up (%d requests)", d.Round(time.Millisecond), e.fake.requests.Load())

	id, err := a.Attest(context.Background(), tlsEvidence(leaf))
	if err != nil || id.ID != wlClientID || id.Method != broker.MethodSPIFFEX509 {
		t.Errorf("x509 after up: %+v %v", id, err)
	}
	id, err = a.Attest(context.Background(), bearerEvidence(tok))
	if err != nil || id.ID != wlClientID || id.Method != broker.MethodSPIFFEJWT {
		t.Errorf("jwt after up: %+v %v", id, err)
	}
	got, err := mtls(t, a, client)
	if err != nil || !sameCert(got, brokerCert) {
		t.Errorf("handshake after up: %v (server cert matches: %v)", err, sameCert(got, brokerCert))
	}
	if n := e.fake.badHeader.Load(); n != 0 {
		t.Errorf("%d requests without the security header", n)
	}
}

// TestSPIFFEWorkloadAPISVIDRotation (T-F1 b): a new broker SVID pushed by
// the Workload API is presented on the next handshakes, same attestor.
func TestSPIFFEWorkloadAPISVIDRotation(t *testing.T) {
	e := newWLEnv(t)
	first := e.fullStart(t)
	a := e.attestor(t, nil)
	waitReady(t, a)
	cfg := a.ServerTLSConfig() // one config, as the listener holds it
	client := clientCert(t, e.ca, wlClientID)
	hs := func() (*x509.Certificate, error) {
		return mtlsWithConfig(t, cfg, client)
	}
	got, err := hs()
	if err != nil || !sameCert(got, first) {
		t.Fatalf("first handshake: %v (matches first SVID: %v)", err, sameCert(got, first))
	}

	second := e.serveBrokerSVID(t, e.ca, time.Now().Add(2*time.Hour), e.ca)
	d, ok := waitUntil(5*time.Second, func() bool {
		c, err := hs()
		return err == nil && sameCert(c, second)
	})
	if !ok {
		t.Fatal("rotated SVID not presented within 5s")
	}
	t.Logf("rotated SVID presented after %v", d.Round(time.Millisecond))
	for i := 0; i < 3; i++ {
		if got, err := hs(); err != nil || !sameCert(got, second) {
			t.Fatalf("handshake %d after rotation: %v (serial %v, want %v)", i, err, serial(got), second.SerialNumber)
		}
	}
	if sv, err := a.GetX509SVID(); err != nil || !sameCert(sv.Certificates[0], second) {
		t.Errorf("GetX509SVID after rotation: %v", err)
	}
}

func serial(c *x509.Certificate) any {
	if c == nil {
		return nil
	}
	return c.SerialNumber
}

// TestSPIFFEWorkloadAPILost (T-F1 c): the Workload API goes away after
// start; the cached SVID keeps serving until its NotAfter (wall clock: a
// short-lived SVID), then readiness is false and handshakes fail closed.
func TestSPIFFEWorkloadAPILost(t *testing.T) {
	e := newWLEnv(t)
	brokerCert := e.serveBrokerSVID(t, e.ca, time.Now().Add(4*time.Second), e.ca)
	e.serveJWT(t, "k1", e.jwtKey)
	e.fake.start()
	a := e.attestor(t, nil)
	waitReady(t, a)
	client := clientCert(t, e.ca, wlClientID)
	leaf, _ := e.ca.issue(t, wlClientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))

	e.fake.stop()
	if _, err := os.Stat(e.sock); !os.IsNotExist(err) {
		t.Fatalf("socket still there after stop: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // let the sources see the streams break
	if time.Now().After(brokerCert.NotAfter) {
		t.Skip("machine too slow: the short-lived SVID expired before the checks")
	}
	if !a.Ready() {
		t.Error("not ready right after losing the Workload API (cached SVID still valid)")
	}
	if got, err := mtls(t, a, client); err != nil || !sameCert(got, brokerCert) {
		t.Errorf("handshake with the cached SVID: %v", err)
	}
	if _, err := a.Attest(context.Background(), tlsEvidence(leaf)); err != nil {
		t.Errorf("x509 attestation with the cached bundle: %v", err)
	}

	// Wait out NotAfter (second precision in the certificate).
	time.Sleep(time.Until(brokerCert.NotAfter) + 1100*time.Millisecond)
	if a.Ready() {
		t.Error("ready after the cached SVID's NotAfter")
	}
	if _, err := a.GetX509SVID(); err == nil {
		t.Error("GetX509SVID served an expired SVID")
	}
	if _, err := mtls(t, a, client); err == nil {
		t.Error("handshake succeeded with an expired broker SVID (not fail closed)")
	} else {
		t.Logf("handshake after NotAfter: %v", err)
	}
	// Caller evidence fails closed too: the cached bundle can no longer learn
	// that a CA was removed, so it is not trusted once the agent is gone.
	if _, err := a.Attest(context.Background(), tlsEvidence(leaf)); !errors.Is(err, ErrSPIFFEUnavailable) {
		t.Errorf("x509 evidence after the broker SVID expired: %v, want ErrSPIFFEUnavailable", err)
	}
}

// TestSPIFFEWorkloadAPILostClock (T-F1 c, with the Clock option): the same
// fail-closed point, reached by advancing the attestor's clock instead of
// waiting.
func TestSPIFFEWorkloadAPILostClock(t *testing.T) {
	e := newWLEnv(t)
	brokerCert := e.fullStart(t)
	clock := &fakeClock{t: time.Now()}
	a := e.attestor(t, clock)
	waitReady(t, a)
	e.fake.stop()
	client := clientCert(t, e.ca, wlClientID)
	time.Sleep(100 * time.Millisecond)

	clock.Advance(time.Until(brokerCert.NotAfter) - time.Minute)
	if !a.Ready() {
		t.Error("not ready a minute before NotAfter")
	}
	if _, err := mtls(t, a, client); err != nil {
		t.Errorf("handshake a minute before NotAfter: %v", err)
	}
	clock.Advance(time.Minute + time.Second)
	if a.Ready() {
		t.Error("ready after NotAfter")
	}
	if _, err := mtls(t, a, client); err == nil {
		t.Error("handshake after NotAfter succeeded")
	}
}

// TestSPIFFEWorkloadAPIBundleRotation (T-F1 d, spire#2704): the Workload
// API moves the trust bundle to a new CA; while both are published both
// verify, afterwards an SVID from the old CA is refused and one from the
// new CA accepted. The JWT authority rotates the same way.
func TestSPIFFEWorkloadAPIBundleRotation(t *testing.T) {
	e := newWLEnv(t)
	e.fullStart(t)
	a := e.attestor(t, nil)
	waitReady(t, a)
	ca2 := newWLCA(t, wlTD, "CA2")
	oldLeaf, _ := e.ca.issue(t, wlClientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	newLeaf, _ := ca2.issue(t, wlClientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	oldClient, newClient := clientCert(t, e.ca, wlClientID), clientCert(t, ca2, wlClientID)
	attests := func(c *x509.Certificate) error {
		_, err := a.Attest(context.Background(), tlsEvidence(c))
		return err
	}

	if err := attests(oldLeaf); err != nil {
		t.Fatalf("old CA before rotation: %v", err)
	}
	expectRejectedTB(t, attests(newLeaf), "does not verify")
	if _, err := mtls(t, a, newClient); err == nil {
		t.Error("handshake with a new-CA SVID before the bundle has it")
	}

	// Overlap: both CAs published, broker SVID now from CA2.
	e.serveBrokerSVID(t, ca2, time.Now().Add(time.Hour), e.ca, ca2)
	if _, ok := waitUntil(5*time.Second, func() bool { return attests(newLeaf) == nil }); !ok {
		t.Fatal("new CA not accepted within 5s of being published")
	}
	if err := attests(oldLeaf); err != nil {
		t.Errorf("old CA during overlap: %v", err)
	}

	// Old CA removed.
	e.serveBrokerSVID(t, ca2, time.Now().Add(time.Hour), ca2)
	if _, ok := waitUntil(5*time.Second, func() bool { return attests(oldLeaf) != nil }); !ok {
		t.Fatal("old CA still accepted 5s after removal from the bundle")
	}
	expectRejectedTB(t, attests(oldLeaf), "does not verify")
	if err := attests(newLeaf); err != nil {
		t.Errorf("new CA after rotation: %v", err)
	}
	if _, err := mtls(t, a, oldClient); err == nil {
		t.Error("handshake with a rotated-out CA's SVID succeeded")
	}
	if _, err := mtls(t, a, newClient); err != nil {
		t.Errorf("handshake with the new CA's SVID: %v", err)
	}

	// JWT authority rotation: k1 → k2.
	key2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tok1 := signJWTSVID(t, e.jwtKey, jose.ES256, "k1", svidClaims(wlClientID, "keygate", time.Now().Add(time.Minute)))
	tok2 := signJWTSVID(t, key2, jose.ES256, "k2", svidClaims(wlClientID, "keygate", time.Now().Add(time.Minute)))
	if _, err := a.Attest(context.Background(), bearerEvidence(tok1)); err != nil {
		t.Fatalf("k1 before JWT rotation: %v", err)
	}
	e.serveJWT(t, "k2", key2)
	if _, ok := waitUntil(5*time.Second, func() bool {
		_, err := a.Attest(context.Background(), bearerEvidence(tok2))
		return err == nil
	}); !ok {
		t.Fatal("k2 not accepted within 5s")
	}
	_, err := a.Attest(context.Background(), bearerEvidence(tok1))
	expectRejectedTB(t, err, "signature", tok1)
}

func expectRejectedTB(t *testing.T, err error, reason string, secrets ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("accepted, want rejection %q", reason)
		return
	}
	expectRejected(t, err, reason, secrets...)
}

// ---- benchmarks: attestation against the cached Workload API material

func benchAttestor(b *testing.B) (*wlEnv, *SPIFFE) {
	e := newWLEnv(b)
	e.fullStart(b)
	a, err := NewSPIFFE(context.Background(), SPIFFEOptions{TrustDomain: wlTD, Bundle: BundleWorkloadAPI, Socket: e.sock})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = a.Close() })
	if _, ok := waitUntil(wlReadyWait, a.Ready); !ok {
		b.Fatal("not ready")
	}
	return e, a
}

func BenchmarkSPIFFEAttestX509(b *testing.B) {
	e, a := benchAttestor(b)
	leaf, _ := e.ca.issue(b, wlClientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	ev := tlsEvidence(leaf)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.Attest(ctx, ev); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSPIFFEAttestJWT(b *testing.B) {
	e, a := benchAttestor(b)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: e.jwtKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), "k1"))
	if err != nil {
		b.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(svidClaims(wlClientID, "keygate", time.Now().Add(time.Hour))).Serialize()
	if err != nil {
		b.Fatal(err)
	}
	ev := bearerEvidence(tok)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.Attest(ctx, ev); err != nil {
			b.Fatal(err)
		}
	}
}
