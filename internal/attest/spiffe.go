// SPIFFE attestor: a caller proves itself with an X509-SVID (the client
// certificate of the proxy_tls listener) or a JWT-SVID (Proxy-Authorization
// on any listener), both checked against the trust bundle of one configured
// trust domain.
//
// Security contract:
//
//   - X509-SVID: Evidence.TLS with a peer certificate. The chain is verified
//     again here against the bundle (go-spiffe x509svid.Verify, at the
//     Clock's time), even though the proxy_tls listener's TLS config already
//     did, so an attestor fed TLS evidence from some other listener never
//     trusts an unverified certificate. The SPIFFE ID is the leaf's single
//     URI SAN; it must be in the trust domain. Identity: ID = SPIFFE ID,
//     method spiffe-x509. A TLS leg without a peer certificate is not X509
//     evidence (the JWT path is tried).
//   - JWT-SVID: Proxy-Authorization "Bearer <jwt>" or the password of Basic
//     proxy credentials (ProxyToken). Routing only: a value that is not a
//     compact JWS, or whose unverified sub is not a SPIFFE ID, gives
//     ErrNoEvidence so a later attestor (oidc) can try it. A sub in another
//     trust domain is rejected (ErrInvalidEvidence): put an oidc attestor
//     whose tokens carry SPIFFE-ID subjects of another domain before this one.
//     The token is then fully validated with go-spiffe
//     jwtsvid.ParseAndValidate: signature by a JWT authority of the bundle
//     (kid required; RS*, PS*, ES* only), exp present and not past, nbf,
//     aud containing one of Audiences. go-spiffe checks times against the
//     system clock with go-jose's 1 minute leeway.
//   - Errors carry a short fixed reason, never a token, a kid or a claim.
//   - Bundles are looked up only for the configured trust domain, so a
//     federated bundle the Workload API also returns is never used.
//
// Trust material:
//
//   - bundle "workload_api": an X509Source (the broker's own SVID) and a
//     BundleSource (X.509 and JWT authorities) on the Workload API socket
//     (Socket, else SPIFFE_ENDPOINT_SOCKET). NewSPIFFE does not wait for
//     them: they are created in the background and retried until they
//     arrive. Until then Ready is false, TLS handshakes on proxy_tls fail
//     (no certificate) and SPIFFE evidence is denied with
//     ErrSPIFFEUnavailable. Updates (SVID rotation, bundle changes) are used
//     as they arrive. If the Workload API disappears later the cached SVID
//     and bundles keep serving until the SVID's NotAfter; then
//     GetX509SVID fails (handshakes fail closed) and Ready is false.
//   - bundle FILE: a SPIFFE bundle (JWKS, holding X.509 and JWT authorities)
//     or a PEM file of X.509 authorities (then JWT-SVIDs cannot be
//     validated and are rejected). The broker's own SVID, for proxy_tls,
//     comes from SVIDCert/SVIDKey. The files are re-read when their
//     modification time changes (checked every fileCheckInterval); a file
//     that fails to load keeps the previous material.
package attest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/keygate/broker/internal/broker"
)

// BundleWorkloadAPI is the bundle setting that takes trust material from the
// SPIFFE Workload API.
const BundleWorkloadAPI = "workload_api"

// DefaultSPIFFEAudience is the JWT-SVID audience accepted when none is
// configured.
const DefaultSPIFFEAudience = "keygate"

const (
	fileCheckInterval  = 5 * time.Second
	sourceRetryBackoff = time.Second
)

// ErrSPIFFEUnavailable is wrapped when SPIFFE evidence arrives before any
// trust material has (Workload API not reachable yet): an internal failure
// that denies, distinct from rejected evidence.
var ErrSPIFFEUnavailable = errors.New("attest: spiffe: trust material not available")

// Rejection reasons. Fixed strings: never token or certificate material.
var (
	errSPIFFETooLarge     = spiffeInvalid("token too large")
	errSPIFFEForeignTD    = spiffeInvalid("SPIFFE ID is not in the trust domain")
	errSPIFFECert         = spiffeInvalid("X509-SVID does not verify against the trust bundle")
	errSPIFFEBadID        = spiffeInvalid("certificate has no valid SPIFFE ID")
	errSPIFFEExpired      = spiffeInvalid("JWT-SVID expired")
	errSPIFFENotYetValid  = spiffeInvalid("JWT-SVID not yet valid")
	errSPIFFEAudience     = spiffeInvalid("JWT-SVID audience not accepted")
	errSPIFFESignature    = spiffeInvalid("JWT-SVID signature does not verify against the trust bundle")
	errSPIFFEMalformed    = spiffeInvalid("malformed JWT-SVID")
	errSPIFFENoJWTAuthors = spiffeInvalid("trust bundle holds no JWT authorities")
)

func spiffeInvalid(reason string) error {
	return fmt.Errorf("attest: spiffe: %s: %w", reason, broker.ErrInvalidEvidence)
}

// SPIFFEOptions configure NewSPIFFE.
type SPIFFEOptions struct {
	TrustDomain string   // required, e.g. example.org
	Bundle      string   // BundleWorkloadAPI or a bundle file path
	Socket      string   // Workload API address: unix:///path or /path; "" = SPIFFE_ENDPOINT_SOCKET
	Audiences   []string // JWT-SVID audiences; nil = [DefaultSPIFFEAudience]
	SVIDCert    string   // file mode: the broker's own X509-SVID chain (PEM)
	SVIDKey     string   // file mode: its private key (PEM)
	Clock       broker.Clock
	// Offline validates the options (and loads bundle and SVID files) but
	// starts nothing: for `broker validate`, which contacts no Workload API.
	// NewSPIFFE then returns nil.
	Offline bool
}

// SPIFFE attests X509-SVIDs and JWT-SVIDs. It is also the x509svid.Source,
// x509bundle.Source and jwtbundle.Source of the proxy_tls listener.
type SPIFFE struct {
	td    spiffeid.TrustDomain
	aud   []string
	clock broker.Clock

	// workload_api mode
	svids   atomic.Pointer[workloadapi.X509Source]
	bundles atomic.Pointer[workloadapi.BundleSource]

	// file mode
	file atomic.Pointer[fileMaterial]

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type fileMaterial struct {
	svid    *x509svid.SVID // nil when no SVID files are configured
	x509    *x509bundle.Bundle
	jwt     *jwtbundle.Bundle // nil for a PEM bundle
	mtimes  [3]time.Time
	cert    string
	key     string
	bundleF string
}

// NewSPIFFE builds the attestor. In workload_api mode it needs no reachable
// Workload API (see the package comment); in file mode the files must load.
// Background work ends when ctx ends or Close is called.
func NewSPIFFE(ctx context.Context, o SPIFFEOptions) (*SPIFFE, error) {
	td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
	if err != nil || strings.ContainsAny(o.TrustDomain, ":/") {
		return nil, fmt.Errorf("spiffe: trust_domain %q is not a trust domain name", o.TrustDomain)
	}
	s := &SPIFFE{td: td, aud: o.Audiences, clock: o.Clock}
	if len(s.aud) == 0 {
		s.aud = []string{DefaultSPIFFEAudience}
	}
	if s.clock == nil {
		s.clock = broker.SystemClock{}
	}
	ctx, s.cancel = context.WithCancel(ctx)
	switch {
	case o.Bundle == BundleWorkloadAPI:
		if o.SVIDCert != "" || o.SVIDKey != "" {
			s.cancel()
			return nil, errors.New("spiffe: svid files are only used with a bundle file; with workload_api the SVID comes from the Workload API")
		}
		if o.Offline && o.Socket == "" {
			s.cancel() // SPIFFE_ENDPOINT_SOCKET is read where the broker runs
			return nil, nil
		}
		addr, err := workloadAPIAddr(o.Socket)
		if err != nil {
			s.cancel()
			return nil, err
		}
		if o.Offline {
			s.cancel()
			return nil, nil
		}
		s.wg.Add(1)
		go s.connect(ctx, addr)
	case o.Bundle != "":
		if (o.SVIDCert == "") != (o.SVIDKey == "") {
			s.cancel()
			return nil, errors.New("spiffe: svid needs both cert and key")
		}
		m, err := loadFileMaterial(td, o.Bundle, o.SVIDCert, o.SVIDKey)
		if err != nil {
			s.cancel()
			return nil, err
		}
		if o.Offline {
			s.cancel()
			return nil, nil
		}
		s.file.Store(m)
		s.wg.Add(1)
		go s.watchFiles(ctx)
	default:
		s.cancel()
		return nil, errors.New("spiffe: bundle is required (workload_api or a bundle file)")
	}
	return s, nil
}

// workloadAPIAddr normalises the configured socket (or the environment) to
// a go-spiffe address.
func workloadAPIAddr(socket string) (string, error) {
	addr := socket
	if addr == "" {
		var ok bool
		if addr, ok = workloadapi.GetDefaultAddress(); !ok || addr == "" {
			return "", errors.New("spiffe: no Workload API socket: set socket or SPIFFE_ENDPOINT_SOCKET")
		}
	}
	if strings.HasPrefix(addr, "/") {
		addr = "unix://" + addr
	}
	if err := workloadapi.ValidateAddress(addr); err != nil {
		return "", fmt.Errorf("spiffe: socket %q: %v", addr, err)
	}
	return addr, nil
}

// connect creates the Workload API sources, retrying until they arrive or
// ctx ends. go-spiffe's constructors block until the first update and retry
// the stream themselves; an error (such as an invalid address) is retried
// here after a pause.
func (s *SPIFFE) connect(ctx context.Context, addr string) {
	defer s.wg.Done()
	opt := workloadapi.WithClientOptions(workloadapi.WithAddr(addr))
	for ctx.Err() == nil && s.svids.Load() == nil {
		src, err := workloadapi.NewX509Source(ctx, opt)
		if err == nil {
			s.svids.Store(src)
			break
		}
		sleepCtx(ctx, sourceRetryBackoff)
	}
	for ctx.Err() == nil && s.bundles.Load() == nil {
		src, err := workloadapi.NewBundleSource(ctx, opt)
		if err == nil {
			s.bundles.Store(src)
			break
		}
		sleepCtx(ctx, sourceRetryBackoff)
	}
	<-ctx.Done()
	if src := s.svids.Load(); src != nil {
		_ = src.Close()
	}
	if src := s.bundles.Load(); src != nil {
		_ = src.Close()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// Close stops background work and closes the Workload API sources.
func (s *SPIFFE) Close() error {
	s.cancel()
	s.wg.Wait()
	return nil
}

// TrustDomain is the configured trust domain.
func (s *SPIFFE) TrustDomain() spiffeid.TrustDomain { return s.td }

// Ready reports whether trust material has arrived and the broker's own
// SVID (when it has one) is within its validity period.
func (s *SPIFFE) Ready() bool {
	if m := s.file.Load(); m != nil {
		return m.svid == nil || s.svidValid(m.svid)
	}
	src := s.svids.Load()
	if src == nil || s.bundles.Load() == nil {
		return false
	}
	sv, err := src.GetX509SVID()
	return err == nil && s.svidValid(sv)
}

func (s *SPIFFE) svidValid(sv *x509svid.SVID) bool {
	if sv == nil || len(sv.Certificates) == 0 {
		return false
	}
	now := s.clock.Now()
	leaf := sv.Certificates[0]
	return !now.Before(leaf.NotBefore) && !now.After(leaf.NotAfter)
}

// GetX509SVID implements x509svid.Source: the broker's own SVID. It fails
// when none has arrived or when the cached one has expired (fail closed).
func (s *SPIFFE) GetX509SVID() (*x509svid.SVID, error) {
	var sv *x509svid.SVID
	if m := s.file.Load(); m != nil {
		if m.svid == nil {
			return nil, errors.New("attest: spiffe: no svid files configured")
		}
		sv = m.svid
	} else {
		src := s.svids.Load()
		if src == nil {
			return nil, ErrSPIFFEUnavailable
		}
		var err error
		if sv, err = src.GetX509SVID(); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrSPIFFEUnavailable, err)
		}
	}
	if !s.svidValid(sv) {
		return nil, errors.New("attest: spiffe: the broker's X509-SVID is expired or not yet valid")
	}
	return sv, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source for the
// configured trust domain only.
func (s *SPIFFE) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != s.td {
		return nil, fmt.Errorf("attest: spiffe: trust domain %q is not accepted", td)
	}
	if m := s.file.Load(); m != nil {
		return m.x509, nil
	}
	src := s.bundles.Load()
	if src == nil {
		return nil, ErrSPIFFEUnavailable
	}
	return src.GetX509BundleForTrustDomain(td)
}

// GetJWTBundleForTrustDomain implements jwtbundle.Source for the configured
// trust domain only.
func (s *SPIFFE) GetJWTBundleForTrustDomain(td spiffeid.TrustDomain) (*jwtbundle.Bundle, error) {
	if td != s.td {
		return nil, fmt.Errorf("attest: spiffe: trust domain %q is not accepted", td)
	}
	if m := s.file.Load(); m != nil {
		if m.jwt == nil {
			return nil, errSPIFFENoJWTAuthors
		}
		return m.jwt, nil
	}
	src := s.bundles.Load()
	if src == nil {
		return nil, ErrSPIFFEUnavailable
	}
	return src.GetJWTBundleForTrustDomain(td)
}

// available reports whether bundles can be consulted at all.
func (s *SPIFFE) available() bool {
	if s.file.Load() != nil {
		return true
	}
	// From the Workload API, the broker's own SVID is the freshness signal:
	// once it has expired the agent is gone, and the cached bundle can no
	// longer learn that a CA was removed, so evidence is refused (503).
	return s.Ready()
}

// ServerTLSConfig is the proxy_tls listener's configuration: the broker's
// own SVID (looked up per handshake, so rotation applies at once), client
// certificates required and verified against the bundle, and only members
// of the trust domain authorized.
func (s *SPIFFE) ServerTLSConfig() *tls.Config {
	c := tlsconfig.MTLSServerConfig(s, s, tlsconfig.AuthorizeMemberOf(s.td))
	c.MinVersion = tls.VersionTLS12
	return c
}

// Attest implements broker.Attestor.
func (s *SPIFFE) Attest(_ context.Context, ev broker.Evidence) (broker.Identity, error) {
	if ev.TLS != nil && len(ev.TLS.PeerCertificates) > 0 {
		return s.attestX509(ev.TLS)
	}
	tok, err := ProxyToken(ev.ProxyAuthorization)
	if err != nil {
		return broker.Identity{}, err
	}
	return s.attestJWT(tok.Reveal())
}

func (s *SPIFFE) attestX509(cs *tls.ConnectionState) (broker.Identity, error) {
	leaf := cs.PeerCertificates[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return broker.Identity{}, errSPIFFEBadID
	}
	if id.TrustDomain() != s.td {
		return broker.Identity{}, errSPIFFEForeignTD
	}
	if !s.available() {
		return broker.Identity{}, ErrSPIFFEUnavailable
	}
	vid, _, err := x509svid.Verify(cs.PeerCertificates, s, x509svid.WithTime(s.clock.Now()))
	if err != nil || vid != id {
		return broker.Identity{}, errSPIFFECert
	}
	// A tunnel opened with this certificate serves until the certificate
	// expires (the connection is not re-handshaken).
	return broker.Identity{ID: id.String(), Method: broker.MethodSPIFFEX509, TrustDomain: s.td.Name(), Expires: leaf.NotAfter}, nil
}

// jwtSVIDAlgs are the algorithms a JWT-SVID may use (the JWT-SVID spec).
var jwtSVIDAlgs = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512, jose.PS256, jose.PS384, jose.PS512,
}

// peekAlgs are parsed while routing, so that a token with a SPIFFE-ID sub
// but a disallowed algorithm is rejected rather than passed on.
var peekAlgs = append([]jose.SignatureAlgorithm{jose.HS256, jose.HS384, jose.HS512, jose.EdDSA}, jwtSVIDAlgs...)

func (s *SPIFFE) attestJWT(raw string) (broker.Identity, error) {
	if len(raw) > maxTokenBytes {
		return broker.Identity{}, errSPIFFETooLarge
	}
	// Routing on unverified content: is this a JWT-SVID at all?
	parsed, err := jwt.ParseSigned(raw, peekAlgs)
	if err != nil {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	var peek struct {
		Sub string `json:"sub"`
	}
	if err := parsed.UnsafeClaimsWithoutVerification(&peek); err != nil {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	id, err := spiffeid.FromString(peek.Sub)
	if err != nil {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	if id.TrustDomain() != s.td {
		return broker.Identity{}, errSPIFFEForeignTD
	}
	if !s.available() {
		return broker.Identity{}, ErrSPIFFEUnavailable
	}
	if m := s.file.Load(); m != nil && m.jwt == nil {
		return broker.Identity{}, errSPIFFENoJWTAuthors
	}
	sv, err := jwtsvid.ParseAndValidate(raw, s, s.aud)
	if err != nil {
		return broker.Identity{}, classifyJWTSVIDError(err)
	}
	return broker.Identity{
		ID:          sv.ID.String(),
		Method:      broker.MethodSPIFFEJWT,
		TrustDomain: s.td.Name(),
		Claims:      sv.Claims,
		Expires:     sv.Expiry,
	}, nil
}

// classifyJWTSVIDError maps go-spiffe's errors (whose text quotes key ids,
// audiences and trust domains) to fixed reasons.
func classifyJWTSVIDError(err error) error {
	if errors.Is(err, ErrSPIFFEUnavailable) {
		return err
	}
	if errors.Is(err, errSPIFFENoJWTAuthors) {
		return errSPIFFENoJWTAuthors
	}
	switch {
	case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
		return errSPIFFENotYetValid
	case errors.Is(err, jwt.ErrExpired):
		return errSPIFFEExpired
	case errors.Is(err, jwt.ErrInvalidAudience):
		return errSPIFFEAudience
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "token has expired"):
		return errSPIFFEExpired
	case strings.Contains(msg, "expected audience"):
		return errSPIFFEAudience
	case strings.Contains(msg, "no JWT authority"), strings.Contains(msg, "unable to get claims"),
		strings.Contains(msg, "missing key id"), strings.Contains(msg, "no bundle found"):
		return errSPIFFESignature
	}
	return errSPIFFEMalformed
}

// ---- file mode

func loadFileMaterial(td spiffeid.TrustDomain, bundle, cert, key string) (*fileMaterial, error) {
	m := &fileMaterial{cert: cert, key: key, bundleF: bundle}
	m.mtimes = fileMtimes(bundle, cert, key)
	data, err := os.ReadFile(bundle)
	if err != nil {
		return nil, fmt.Errorf("spiffe: bundle: %w", err)
	}
	if b, err := spiffebundle.Parse(td, data); err == nil {
		m.x509 = b.X509Bundle()
		if len(b.JWTAuthorities()) > 0 {
			m.jwt = b.JWTBundle()
		}
	} else if xb, perr := x509bundle.Parse(td, data); perr == nil {
		m.x509 = xb
	} else {
		return nil, fmt.Errorf("spiffe: bundle %s is neither a SPIFFE bundle (JWKS) nor PEM certificates", bundle)
	}
	if len(m.x509.X509Authorities()) == 0 && m.jwt == nil {
		return nil, fmt.Errorf("spiffe: bundle %s holds no authorities", bundle)
	}
	if cert != "" {
		sv, err := x509svid.Load(cert, key)
		if err != nil {
			return nil, fmt.Errorf("spiffe: svid: %v", err)
		}
		if sv.ID.TrustDomain() != td {
			return nil, fmt.Errorf("spiffe: svid %s is not in trust domain %s", sv.ID, td)
		}
		m.svid = sv
	}
	return m, nil
}

func fileMtimes(paths ...string) [3]time.Time {
	var out [3]time.Time
	for i, p := range paths {
		if p == "" || i >= len(out) {
			continue
		}
		if fi, err := os.Stat(p); err == nil {
			out[i] = fi.ModTime()
		}
	}
	return out
}

// watchFiles re-reads the bundle and SVID files when they change; a failed
// load keeps the previous material.
func (s *SPIFFE) watchFiles(ctx context.Context) {
	defer s.wg.Done()
	t := time.NewTicker(fileCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		old := s.file.Load()
		if fileMtimes(old.bundleF, old.cert, old.key) == old.mtimes {
			continue
		}
		if m, err := loadFileMaterial(s.td, old.bundleF, old.cert, old.key); err == nil {
			s.file.Store(m)
		}
	}
}
