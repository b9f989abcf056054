package dbproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// Dialer is the egress path for every upstream connection (sessions and
// cancels). *egress.Dialer satisfies it; its refusals should arrive as a
// *broker.Error with CodeEgressDenied (config wraps it so).
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Database is one databases: entry.
type Database struct {
	Name       string
	Upstream   string // host:port
	Credential string // a key of Pipeline.Sources; needs username and password
	TLS        TLSMode
	// RootCAs verify the server in verify-full; nil means the system roots.
	RootCAs *x509.CertPool
	// ServerName is the name verified in verify-full; default the
	// upstream's host.
	ServerName string
	// AllowOptions forwards the client's "options" startup parameter
	// (command-line switches such as -c search_path=...); otherwise it is
	// dropped and the client is told in a notice.
	AllowOptions bool
	// AllowReplication accepts replication connections (physical or
	// logical); otherwise they are refused with 28000.
	AllowReplication bool
	// RDSIAM, when set, logs in as RDSIAM.User with an RDS IAM
	// authentication token signed, per session, by the credential (an
	// aws_sts one) instead of the credential's username and password.
	// Needs TLS verify-full.
	RDSIAM *RDSIAM
}

// Metrics are the shared series a database listener updates (DESIGN.md
// §8); any may be nil.
type Metrics struct {
	Requests *prometheus.CounterVec // keygate_requests_total{decision, rule}
	Active   *prometheus.GaugeVec   // keygate_active_connections{listener}
}

// Options configure a Server.
type Options struct {
	Database Database
	Pipeline *broker.Pipeline
	Dialer   Dialer
	// ClientTLS is offered to clients that send SSLRequest; nil answers 'N'
	// (the client then continues in clear, or gives up if it requires TLS).
	// See ClientTLSConfig.
	ClientTLS    *tls.Config
	Logger       *zap.Logger
	Clock        broker.Clock
	Fingerprints *broker.Fingerprinter
	Metrics      *Metrics
	// HandshakeTimeout bounds the client's part of the startup (SSLRequest,
	// TLS, StartupMessage); default 10s.
	HandshakeTimeout time.Duration
	// UpstreamTimeout bounds credential fetch, connect, TLS and
	// authentication upstream; default 30s.
	UpstreamTimeout time.Duration
	// TerminateGrace is how long ending a session waits for the server
	// message in flight to finish, so the client gets a clean FATAL;
	// default 2s.
	TerminateGrace time.Duration
}

// Server serves one databases: entry on one listener.
type Server struct {
	opts        Options
	db          Database
	name        string // the listener name: "db:" + Database.Name
	pipe        atomic.Pointer[broker.Pipeline]
	log         *zap.Logger
	upstreamTLS *tls.Config
	host        string
	port        int

	mu       sync.Mutex
	closed   bool
	lns      map[net.Listener]struct{}
	conns    map[net.Conn]struct{} // in the startup phase
	sessions map[*session]struct{} // spliced
	keys     map[cancelKey]*session
	wg       sync.WaitGroup
	idle     chan struct{} // closed when conns and sessions are empty during Shutdown
}

// New checks the options; it opens nothing.
func New(o Options) (*Server, error) {
	db := o.Database
	switch {
	case o.Pipeline == nil:
		return nil, errors.New("dbproxy: no pipeline")
	case o.Dialer == nil:
		return nil, errors.New("dbproxy: no egress dialer")
	case o.Logger == nil:
		return nil, errors.New("dbproxy: no logger")
	case db.Name == "":
		return nil, errors.New("dbproxy: the database has no name")
	case db.Credential == "":
		return nil, errors.New("dbproxy: database " + db.Name + " names no credential")
	}
	if db.TLS == "" {
		db.TLS = TLSVerifyFull
	}
	switch db.TLS {
	case TLSDisable, TLSRequire, TLSVerifyFull:
	default:
		return nil, errors.New("dbproxy: unknown tls mode " + strconv.Quote(string(db.TLS)))
	}
	if db.RDSIAM != nil {
		if err := checkRDSIAM(db); err != nil {
			return nil, err
		}
	}
	host, portStr, err := net.SplitHostPort(db.Upstream)
	port, perr := strconv.Atoi(portStr)
	if err != nil || perr != nil || host == "" || port < 1 || port > 65535 {
		return nil, errors.New("dbproxy: upstream " + strconv.Quote(db.Upstream) + " is not host:port")
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	if o.Fingerprints == nil {
		o.Fingerprints = broker.NewFingerprinter()
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.UpstreamTimeout <= 0 {
		o.UpstreamTimeout = 30 * time.Second
	}
	if o.TerminateGrace <= 0 {
		o.TerminateGrace = 2 * time.Second
	}
	o.Database = db
	s := &Server{
		opts:        o,
		db:          db,
		name:        "db:" + db.Name,
		log:         o.Logger,
		upstreamTLS: upstreamTLSConfig(db),
		host:        normalizeHost(host),
		port:        port,
		lns:         map[net.Listener]struct{}{},
		conns:       map[net.Conn]struct{}{},
		sessions:    map[*session]struct{}{},
		keys:        map[cancelKey]*session{},
	}
	s.pipe.Store(o.Pipeline)
	return s, nil
}

// normalizeHost is the Target spelling rules see: lower case, no trailing
// dot, IPv6 without brackets (SplitHostPort removed them), IPv4-mapped
// unmapped.
func normalizeHost(h string) string {
	if ip, err := netip.ParseAddr(h); err == nil {
		return ip.Unmap().String()
	}
	b := []byte(h)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	if n := len(b); n > 1 && b[n-1] == '.' {
		b = b[:n-1]
	}
	return string(b)
}

// Listener is the name in audit lines and evidence: "db:" + the entry's name.
func (s *Server) Listener() string { return s.name }

// SetPipeline swaps in a reloaded pipeline; sessions already set up keep
// the one they were decided under.
func (s *Server) SetPipeline(p *broker.Pipeline) {
	if p != nil {
		s.pipe.Store(p)
	}
}

// ClientTLSConfig is the TLS a database listener offers clients: a leaf
// from the broker CA for the name the client asked for (SNI), or for the
// listener's address when it sent none, and an optional client
// certificate, which the spiffe attestor verifies as an X509-SVID (the TLS
// layer checks only that the client holds its key).
func ClientTLSConfig(leaf func(host string) (*tls.Certificate, error)) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequestClientCert,
		NextProtos: []string{"postgresql"},
		GetCertificate: func(hi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			host := hi.ServerName
			if host == "" {
				host = "localhost"
				if hi.Conn != nil {
					if ap, err := netip.ParseAddrPort(hi.Conn.LocalAddr().String()); err == nil {
						host = ap.Addr().Unmap().String()
					}
				}
			}
			return leaf(host)
		},
	}
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("dbproxy: server closed")

// Serve accepts connections on ln until Shutdown or an accept error.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			continue
		}
		go s.handle(c)
	}
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	if m := s.opts.Metrics; m != nil && m.Active != nil {
		m.Active.WithLabelValues(s.name).Inc()
	}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.checkIdleLocked()
	s.mu.Unlock()
	if m := s.opts.Metrics; m != nil && m.Active != nil {
		m.Active.WithLabelValues(s.name).Dec()
	}
	s.wg.Done()
}

func (s *Server) checkIdleLocked() {
	if s.idle != nil && len(s.conns) == 0 && len(s.sessions) == 0 {
		close(s.idle)
		s.idle = nil
	}
}

// Shutdown stops accepting, lets open sessions run until ctx ends, then
// ends them (the clients get FATAL 57P01) and waits for their audit lines.
// It returns ctx's error when sessions had to be ended.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.lns {
		_ = ln.Close()
	}
	var idle chan struct{}
	if len(s.conns) > 0 || len(s.sessions) > 0 {
		idle = make(chan struct{})
		s.idle = idle
	}
	s.mu.Unlock()
	var err error
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			err = ctx.Err()
			s.mu.Lock()
			for c := range s.conns {
				_ = c.Close() // still in the startup phase: nothing to be polite about
			}
			for sess := range s.sessions {
				sess.terminate("terminating connection: the broker is shutting down")
			}
			s.mu.Unlock()
		}
	}
	s.wg.Wait()
	return err
}
