package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// A fake SPIFFE Workload API in the style of go-spiffe's (non-importable)
// internal/test/fakeworkloadapi: a gRPC server on a unix socket whose
// streaming responses the test sets and replaces. Every stream re-sends the
// current response when it changes. Requests without the
// "workload.spiffe.io: true" metadata are refused with InvalidArgument (as
// SPIRE does) and counted.

var errNoIdentity = status.Error(codes.PermissionDenied, "no identity issued")

type fakeWorkloadAPI struct {
	tb   testing.TB
	sock string

	mu          sync.Mutex
	x509        *workload.X509SVIDResponse
	x509Bundles *workload.X509BundlesResponse
	jwtBundles  *workload.JWTBundlesResponse
	subs        map[chan struct{}]struct{}

	srv       *grpc.Server
	served    chan struct{}
	stopOnce  sync.Once
	badHeader atomic.Int32 // requests refused for missing metadata
	requests  atomic.Int32 // requests with valid metadata
}

// newFakeWorkloadAPI makes a fake that does not listen yet (see start).
func newFakeWorkloadAPI(tb testing.TB, sock string) *fakeWorkloadAPI {
	return &fakeWorkloadAPI{tb: tb, sock: sock, subs: map[chan struct{}]struct{}{}}
}

// start listens on the unix socket and serves until stop (or test cleanup).
func (f *fakeWorkloadAPI) start() {
	f.tb.Helper()
	l, err := net.Listen("unix", f.sock)
	if err != nil {
		f.tb.Fatal(err)
	}
	f.srv = grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(f.srv, &fakeWorkloadAPIServer{f: f})
	f.served = make(chan struct{})
	go func() {
		defer close(f.served)
		_ = f.srv.Serve(l)
	}()
	f.tb.Cleanup(f.stop)
}

// stop ends every stream and closes the listener (which unlinks the socket).
func (f *fakeWorkloadAPI) stop() {
	f.stopOnce.Do(func() {
		if f.srv == nil {
			return
		}
		f.srv.Stop()
		<-f.served
	})
}

func (f *fakeWorkloadAPI) notify() {
	for ch := range f.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// setX509 sets the FetchX509SVID response (SVID chain, key, bundle) and the
// FetchX509Bundles response (the same bundle).
func (f *fakeWorkloadAPI) setX509(id string, chain []*x509.Certificate, key crypto.Signer, bundle []*x509.Certificate) {
	f.tb.Helper()
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		f.tb.Fatal(err)
	}
	bundleDER := concatDER(bundle)
	td := spiffeid.RequireFromString(id).TrustDomain()
	resp := &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId:    id,
		X509Svid:    concatDER(chain),
		X509SvidKey: keyDER,
		Bundle:      bundleDER,
	}}}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.x509 = resp
	f.x509Bundles = &workload.X509BundlesResponse{Bundles: map[string][]byte{td.IDString(): bundleDER}}
	f.notify()
}

// setJWTBundle sets the FetchJWTBundles response (a JWKS per trust domain).
func (f *fakeWorkloadAPI) setJWTBundle(b *jwtbundle.Bundle) {
	f.tb.Helper()
	js, err := b.Marshal()
	if err != nil {
		f.tb.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jwtBundles = &workload.JWTBundlesResponse{Bundles: map[string][]byte{b.TrustDomain().IDString(): js}}
	f.notify()
}

func concatDER(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

func (f *fakeWorkloadAPI) checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md.Get("workload.spiffe.io")) != 1 || md.Get("workload.spiffe.io")[0] != "true" {
		f.badHeader.Add(1)
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	f.requests.Add(1)
	return nil
}

// stream sends get()'s response now and again on every change, until the
// client goes away or the server stops.
func stream[T any](f *fakeWorkloadAPI, ctx context.Context, get func() *T, send func(*T) error) error {
	if err := f.checkHeader(ctx); err != nil {
		return err
	}
	ch := make(chan struct{}, 1)
	f.mu.Lock()
	f.subs[ch] = struct{}{}
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.subs, ch)
		f.mu.Unlock()
	}()
	for {
		f.mu.Lock()
		resp := get()
		f.mu.Unlock()
		if resp == nil {
			return errNoIdentity
		}
		if err := send(resp); err != nil {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

type fakeWorkloadAPIServer struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	f *fakeWorkloadAPI
}

func (s *fakeWorkloadAPIServer) FetchX509SVID(_ *workload.X509SVIDRequest, st workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	return stream(s.f, st.Context(), func() *workload.X509SVIDResponse { return s.f.x509 }, st.Send)
}

func (s *fakeWorkloadAPIServer) FetchX509Bundles(_ *workload.X509BundlesRequest, st workload.SpiffeWorkloadAPI_FetchX509BundlesServer) error {
	return stream(s.f, st.Context(), func() *workload.X509BundlesResponse { return s.f.x509Bundles }, st.Send)
}

func (s *fakeWorkloadAPIServer) FetchJWTBundles(_ *workload.JWTBundlesRequest, st workload.SpiffeWorkloadAPI_FetchJWTBundlesServer) error {
	return stream(s.f, st.Context(), func() *workload.JWTBundlesResponse { return s.f.jwtBundles }, st.Send)
}

func (s *fakeWorkloadAPIServer) FetchJWTSVID(ctx context.Context, _ *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := s.f.checkHeader(ctx); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unimplemented, "not implemented by the fake")
}

func (s *fakeWorkloadAPIServer) ValidateJWTSVID(ctx context.Context, _ *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if err := s.f.checkHeader(ctx); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unimplemented, "not implemented by the fake")
}

// ---- test PKI usable from benchmarks (testing.TB)

type wlCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newWLCA(tb testing.TB, td, name string) *wlCA {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + td)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: td + " " + name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return &wlCA{cert: cert, key: key}
}

func (ca *wlCA) issue(tb testing.TB, id string, notBefore, notAfter time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	u, err := url.Parse(id)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return cert, key
}

// waitUntil polls cond every 20ms until it holds or d passes; it returns
// how long that took and whether cond held.
func waitUntil(d time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > d {
			return time.Since(start), false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var errNoServerCert = errors.New("no server certificate")
