package config

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/dbproxy"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/intercept"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/intercept/egress"
	"github.com/keygate/broker/internal/rules"
)

// parseCache reads a credential's cache setting: "" or "none" (no caching)
// or a duration.
func parseCache(s string) (time.Duration, error) {
	if s == "" || s == "none" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("cache must be none or a positive duration like 5m, not %q", s)
	}
	return d, nil
}

// Policy is the compiled rule set plus what explain needs to describe the
// credentials it grants. Building it resolves no secret and contacts nothing.
type Policy struct {
	Rules *rules.Set
	Kinds map[string]string // credential name -> source type
}

// Policy validates the file and compiles its rules and injectors.
func (c *Config) Policy(clock broker.Clock) (*Policy, error) {
	ps := c.validate()
	set, rps := c.compileRules(clock)
	ps = append(ps, rps...)
	if len(ps) > 0 {
		return nil, sortProblems(ps)
	}
	kinds := make(map[string]string, len(c.Credentials))
	for n, cr := range c.Credentials {
		kinds[n] = cr.Source
	}
	return &Policy{Rules: set, Kinds: kinds}, nil
}

func (c *Config) compileRules(clock broker.Clock) (*rules.Set, Problems) {
	var ps Problems
	specs := make([]rules.Spec, 0, len(c.Rules))
	for i, r := range c.Rules {
		s := rules.Spec{
			Name:           r.Name,
			Hosts:          r.Hosts,
			Ports:          r.Ports,
			When:           r.When,
			WhenPos:        rules.Pos{File: c.Path, Line: c.line("rules", i, "when")},
			Action:         r.Action,
			AllowPlaintext: r.AllowPlaintext,
			AllowAnonymous: r.AllowAnonymous,
			Pos:            rules.Pos{File: c.Path, Line: c.line("rules", i)},
		}
		if r.Inject != nil && !r.Inject.As.bad {
			inj, err := buildInjector(r.Inject.As, clock)
			if err != nil {
				ps = append(ps, c.problem(fmt.Sprintf("rule %q: %v", r.Name, err), "rules", i, "inject", "as"))
			}
			s.Inject = &broker.Injection{Credential: r.Inject.Credential, Injector: inj}
		}
		specs = append(specs, s)
	}
	var connectPorts []int // bad entries are reported by validate, with their line
	for _, p := range c.Egress.ConnectPorts {
		if p >= 1 && p <= 65535 {
			connectPorts = append(connectPorts, p)
		}
	}
	set, errs := rules.Compile(specs, rules.Options{ConnectPorts: connectPorts, Clock: clock})
	for _, err := range errs {
		var ce *rules.CompileError
		if errors.As(err, &ce) {
			ps = append(ps, Problem{File: c.Path, Line: ce.Pos.Line, Msg: strings.TrimPrefix(ce.Error(), fmt.Sprintf("%s:%d: ", ce.Pos.File, ce.Pos.Line))})
		} else {
			ps = append(ps, Problem{File: c.Path, Msg: err.Error()})
		}
	}
	return set, ps
}

func buildInjector(as InjectAs, clock broker.Clock) (broker.Injector, error) {
	switch as.Kind {
	case "bearer":
		return inject.Bearer(), nil
	case "basic":
		return inject.Basic(), nil
	case "header":
		return inject.Header(as.Header.Name, as.Header.Format)
	case "query":
		return inject.Query(as.Query.Name)
	case "sigv4":
		return buildSigV4(as.SigV4, clock)
	case "":
		return nil, errors.New("inject.as is required (bearer, basic, sigv4, {header: {name, format}} or {query: {name}})")
	}
	return nil, fmt.Errorf("inject.as: unknown injector %q (want bearer, basic, sigv4, header or query)", as.Kind)
}

func sortProblems(ps Problems) Problems {
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
	return ps
}

// BuildOptions are the process-level inputs the file does not hold.
type BuildOptions struct {
	Logger *zap.Logger
	Clock  broker.Clock
	// DryRun builds everything (CA, secrets, rules) but opens no listener,
	// writes no file and starts nothing: `broker validate`.
	DryRun bool
}

// Runtime is a built broker, ready to Run.
type Runtime struct {
	Proxy        *intercept.Proxy
	Registry     *prometheus.Registry
	ProxyAddr    net.Addr
	ProxyTLS     *intercept.Proxy // nil unless listen.proxy_tls is set
	ProxyTLSAddr net.Addr         // nil unless listen.proxy_tls is set
	// TransparentAddr is the REDIRECT target; nil unless listen.transparent is set.
	TransparentAddr net.Addr
	AdminAddr       net.Addr // nil when no admin listener
	CACertPath      string   // where clients find the CA (ephemeral cert_out or ca.cert)
	DemoURL         string   // the demo echo upstream, when enabled
	// Databases serve the databases: entries, in file order; DatabaseAddrs
	// are their listeners' addresses.
	Databases     []*dbproxy.Server
	DatabaseAddrs []net.Addr

	log       *zap.Logger
	proxyLn   net.Listener
	adminLn   net.Listener
	admin     *http.Server
	demo      *demoServer
	readyFlag func() bool
	// proxy_tls: the TCP listener and the TLS listener served over it.
	proxyTLSLn    net.Listener
	proxyTLSServe net.Listener
	transparentLn net.Listener
	dbLns         []net.Listener
	// stopAttestors ends attestors' background work (key refreshes).
	stopAttestors context.CancelFunc
	// vaults are the Vault connections: Run logs them in, shutdown closes
	// them after the credential caches (which revoke their leases).
	vaults []*inject.Vault
	reload reloadState
}

// Build validates the file and composes the broker. On error nothing is
// left open.
func (c *Config) Build(o BuildOptions) (_ *Runtime, err error) {
	if o.Logger == nil {
		return nil, errors.New("config: no logger")
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	ps := c.validate()
	set, rps := c.compileRules(o.Clock)
	if ps = append(ps, rps...); len(ps) > 0 {
		return nil, sortProblems(ps)
	}
	rt := &Runtime{Registry: prometheus.NewRegistry(), log: o.Logger}
	defer func() {
		if err != nil {
			rt.closeListeners()
		}
	}()
	rt.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := intercept.NewMetrics(rt.Registry)
	credMetrics := inject.NewMetrics(rt.Registry)

	authority, err := c.loadCA(o)
	if err != nil {
		ps = append(ps, c.problem(err.Error(), "ca"))
	}
	if authority != nil {
		rt.CACertPath = c.resolvePath(c.CA.CertOut)
		if !c.CA.Ephemeral {
			rt.CACertPath = c.resolvePath(c.CA.Cert)
		}
	}

	// The demo must exist before secrets resolve: it writes the demo token.
	if c.Demo != nil && !o.DryRun && authority != nil {
		rt.demo, err = startDemo(c.Demo.Echo, c.Dir, authority, o.Logger.Named("demo"))
		if err != nil {
			ps = append(ps, c.problem(err.Error(), "demo", "echo"))
		} else {
			rt.DemoURL = rt.demo.url
		}
	}

	roots, err := c.upstreamRoots(authority)
	if err != nil {
		ps = append(ps, c.problem(err.Error(), "egress", "ca_bundle"))
	}
	srcEnv := sourceEnv{ctx: context.Background(), clock: o.Clock, metrics: credMetrics, roots: roots, spiffe: c.spiffeSocket()}
	vaults, vps := c.buildVaults(srcEnv, o.Logger.Named("vault"))
	ps = append(ps, vps...)
	sources, sps := c.buildSources(srcEnv, vaults)
	ps = append(ps, sps...)
	var attestCtx context.Context
	attestCtx, rt.stopAttestors = context.WithCancel(context.Background())
	chain, readyChecks, spiffe, aps := c.buildAttestors(attestCtx, metrics, roots, o.Clock, o.DryRun)
	ps = append(ps, aps...)
	delegation, dready, dps := c.buildDelegation(attestCtx, roots, o.Clock, o.DryRun)
	ps = append(ps, dps...)
	readyChecks = append(readyChecks, dready...)
	for _, name := range slices.Sorted(maps.Keys(vaults)) {
		if v := vaults[name]; v != nil {
			// Ready once the broker holds a Vault token (Run logs in).
			rt.vaults = append(rt.vaults, v)
			readyChecks = append(readyChecks, v.Ready)
		}
	}
	dbRoots, dbps := c.databaseRoots(roots)
	ps = append(ps, dbps...)
	if len(ps) > 0 {
		return nil, sortProblems(ps)
	}
	if o.DryRun {
		return rt, nil
	}

	if rt.proxyLn, err = c.listenProxy(); err != nil {
		return nil, Problems{c.problem(fmt.Sprintf("listen.proxy: %v", err), "listen", "proxy")}
	}
	rt.ProxyAddr = rt.proxyLn.Addr()
	var self []netip.AddrPort
	if ap := addrPort(rt.proxyLn.Addr()); ap.IsValid() {
		self = append(self, ap)
	}
	if c.Listen.Admin != "" {
		if rt.adminLn, err = net.Listen("tcp", c.Listen.Admin); err != nil {
			return nil, Problems{c.problem(fmt.Sprintf("listen.admin: %v", err), "listen", "admin")}
		}
		rt.AdminAddr = rt.adminLn.Addr()
		self = append(self, addrPort(rt.adminLn.Addr()))
	}
	if c.Listen.ProxyTLS != "" {
		if spiffe == nil { // validate requires one; never serve TLS without it
			return nil, Problems{c.problem("listen.proxy_tls needs a spiffe attestor", "listen", "proxy_tls")}
		}
		if rt.proxyTLSLn, err = net.Listen("tcp", c.Listen.ProxyTLS); err != nil {
			return nil, Problems{c.problem(fmt.Sprintf("listen.proxy_tls: %v", err), "listen", "proxy_tls")}
		}
		rt.ProxyTLSAddr = rt.proxyTLSLn.Addr()
		self = append(self, addrPort(rt.proxyTLSLn.Addr()))
	}
	if c.Listen.Transparent != "" {
		if rt.transparentLn, err = net.Listen("tcp", c.Listen.Transparent); err != nil {
			return nil, Problems{c.problem(fmt.Sprintf("listen.transparent: %v", err), "listen", "transparent")}
		}
		rt.TransparentAddr = rt.transparentLn.Addr()
		self = append(self, addrPort(rt.transparentLn.Addr()))
	}
	if rt.dbLns, err = c.listenDatabases(); err != nil {
		return nil, err
	}
	for _, ln := range rt.dbLns {
		rt.DatabaseAddrs = append(rt.DatabaseAddrs, ln.Addr())
		if ap := addrPort(ln.Addr()); ap.IsValid() {
			self = append(self, ap)
		}
	}

	dialer := egress.New(egress.Options{
		DenyPrivate: c.Egress.DenyPrivate == nil || *c.Egress.DenyPrivate,
		AllowCIDRs:  mustPrefixes(c.Egress.AllowCIDRs),
		SelfAddrs:   self,
		// Also the PostgreSQL listeners' upstream dials: one DNS bound.
		ResolveTimeout: time.Duration(c.Limits.ResolveTimeout),
	})
	leaves := authority.Leaves(ca.LeafOptions{
		Lifetime:   time.Duration(c.CA.LeafLifetime),
		MaxEntries: c.CA.LeafCacheSize,
		Clock:      o.Clock,
		OnMint:     metrics.LeafCache.WithLabelValues("mint").Inc,
		OnHit:      metrics.LeafCache.WithLabelValues("hit").Inc,
	})
	pipe := &broker.Pipeline{Attestor: chain, Policy: set, Sources: sources, Clock: o.Clock}
	// One tunnel cap and one mint budget for the whole broker: proxy,
	// proxy_tls and transparent connections draw on the same ones.
	tunnels := intercept.NewTunnelCap(positive(c.Limits.MaxTunnels), metrics.TunnelsOpen)
	mints := intercept.NewMintLimiter(positive(c.Limits.LeafMintsPerSecond), 0, o.Clock)
	rt.reload = reloadState{cfg: c, clock: o.Clock, chain: chain, credMetrics: credMetrics, roots: roots,
		counter: newReloadCounter(rt.Registry), vaults: vaults, closers: sourceClosers(sources), log: o.Logger}
	rt.Proxy, err = intercept.New(intercept.Options{
		Listener:      "proxy",
		Pipeline:      pipe,
		Dialer:        dialer,
		Leaves:        leaves,
		UpstreamRoots: roots,
		Fingerprints:  broker.NewFingerprinter(),
		Logger:        o.Logger.Named("proxy"),
		Metrics:       metrics,
		Limits: intercept.Limits{
			ReadHeaderTimeout: time.Duration(c.Limits.ReadHeaderTimeout),
			IdleTimeout:       time.Duration(c.Limits.IdleTimeout),
			HandshakeTimeout:  time.Duration(c.Limits.HandshakeTimeout),
			UpstreamTimeout:   time.Duration(c.Limits.UpstreamTimeout),
			MaxHeaderBytes:    c.Limits.MaxHeaderBytes,
			MaxHeaderCount:    positive(c.Limits.MaxHeaderCount),
		},
		Clock:       o.Clock,
		Delegation:  delegation,
		Transparent: rt.transparentLn != nil,
		Tunnels:     tunnels,
		Mints:       mints,
	})
	if err != nil {
		return nil, err
	}
	if rt.proxyTLSLn != nil {
		// The same pipeline, dialer and leaves behind a TLS front door whose
		// clients must present an X509-SVID of the trust domain; the SPIFFE
		// attestor turns it into workload.id.
		rt.ProxyTLS, err = intercept.New(intercept.Options{
			Listener:      "proxy_tls",
			Pipeline:      pipe,
			Dialer:        dialer,
			Leaves:        leaves,
			UpstreamRoots: roots,
			Fingerprints:  broker.NewFingerprinter(),
			Logger:        o.Logger.Named("proxy_tls"),
			Metrics:       metrics,
			Limits: intercept.Limits{
				ReadHeaderTimeout: time.Duration(c.Limits.ReadHeaderTimeout),
				IdleTimeout:       time.Duration(c.Limits.IdleTimeout),
				HandshakeTimeout:  time.Duration(c.Limits.HandshakeTimeout),
				UpstreamTimeout:   time.Duration(c.Limits.UpstreamTimeout),
				MaxHeaderBytes:    c.Limits.MaxHeaderBytes,
				MaxHeaderCount:    positive(c.Limits.MaxHeaderCount),
			},
			Clock:      o.Clock,
			Delegation: delegation,
			Tunnels:    tunnels,
			Mints:      mints,
		})
		if err != nil {
			return nil, err
		}
		rt.proxyTLSServe = tls.NewListener(rt.proxyTLSLn, spiffe.ServerTLSConfig())
	}
	rt.Databases, err = c.buildDatabases(databaseEnv{pipe: pipe, dialer: dialer, leaves: leaves, roots: dbRoots,
		metrics: metrics, clock: o.Clock, log: o.Logger})
	if err != nil {
		return nil, err
	}
	// The CA, rules and secrets are loaded before Build returns; fetched
	// trust material (OIDC keys) must have arrived at least once.
	rt.readyFlag = func() bool {
		for _, r := range readyChecks {
			if !r() {
				return false
			}
		}
		return true
	}
	return rt, nil
}

// listenProxy opens listen.proxy: host:port, or unix:PATH for a Unix
// socket. A socket is world-connectable (0666): who may do what is decided
// by attestation (SO_PEERCRED through the process attestor) and rules, not
// by file permissions. A stale socket file from an earlier run is replaced;
// any other file at the path is an error.
func (c *Config) listenProxy() (net.Listener, error) { return c.listenOn(c.Listen.Proxy) }

// listenOn opens host:port, or unix:PATH (see listenProxy).
func (c *Config) listenOn(addr string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return net.Listen("tcp", addr)
	}
	path = c.resolvePath(path)
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

func addrPort(a net.Addr) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func mustPrefixes(ss []string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ss))
	for _, s := range ss {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func (c *Config) loadCA(o BuildOptions) (*ca.CA, error) {
	if c.CA.Ephemeral {
		out := c.resolvePath(c.CA.CertOut)
		if o.DryRun {
			out = ""
		}
		return ca.Ephemeral(out, o.Clock)
	}
	return ca.Load(c.resolvePath(c.CA.Cert), c.resolvePath(c.CA.Key))
}

// upstreamRoots is the system pool plus egress.ca_bundle, plus the broker's
// own CA when the demo upstream (whose leaf it signs) is enabled.
func (c *Config) upstreamRoots(authority *ca.CA) (*x509.CertPool, error) {
	if c.Egress.CABundle == "" && c.Demo == nil {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if c.Egress.CABundle != "" {
		pem, err := os.ReadFile(c.resolvePath(c.Egress.CABundle))
		if err != nil {
			return nil, fmt.Errorf("egress.ca_bundle: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("egress.ca_bundle: %s holds no PEM certificate", c.Egress.CABundle)
		}
	}
	if c.Demo != nil && authority != nil {
		pool.AddCert(authority.Certificate())
	}
	return pool, nil
}

// buildSources builds every credential; vault sources use the running
// connections in vaults (a name missing from it is reported, a nil
// connection was reported already).
func (c *Config) buildSources(env sourceEnv, vaults map[string]*inject.Vault) (map[string]broker.Source, Problems) {
	var ps Problems
	out := make(map[string]broker.Source, len(c.Credentials))
	for name, cr := range c.Credentials {
		if cr.Source == "oauth2" || cr.Source == "github_app" {
			continue // below, once the credentials their secrets may come from exist
		}
		if cr.Source == "vault_kv" || cr.Source == "vault_dynamic" {
			src, err := c.buildVaultSource(env, vaults, name, cr)
			if err != nil {
				ps = append(ps, c.problem(fmt.Sprintf("credential %q: %v", name, strings.TrimPrefix(err.Error(), "inject: ")), "credentials", name))
				continue
			}
			if src != nil {
				out[name] = src
			}
			continue
		}
		if cr.Source == "aws_sts" {
			src, err := c.buildSTS(env, name, cr)
			if err != nil {
				ps = append(ps, c.problem(fmt.Sprintf("credential %q: %v", name, strings.TrimPrefix(err.Error(), "inject: ")), "credentials", name))
				continue
			}
			out[name] = src
			continue
		}
		fields := map[string]broker.Secret{}
		resolve := func(field, ref string, path ...any) {
			s, err := inject.ResolveRef(c.resolveRef(ref))
			if err != nil {
				ps = append(ps, c.problem(fmt.Sprintf("credential %q: %v", name, err), append([]any{"credentials", name}, path...)...))
				return
			}
			fields[field] = s
		}
		if cr.Value != "" {
			resolve(broker.FieldToken, cr.Value, "value")
		}
		for k, v := range cr.Values {
			resolve(k, v, "values", k)
		}
		ttl, _ := parseCache(cr.Cache)
		out[name] = inject.NewCache(name, inject.NewStatic(name, fields), inject.CacheOptions{TTL: ttl, Clock: env.clock, Metrics: env.metrics})
	}
	ps = append(ps, c.buildTokenSources(env, out)...)
	return out, ps
}

// resolveRef makes file: references config-relative.
func (c *Config) resolveRef(ref string) string {
	if p, ok := strings.CutPrefix(ref, "file:"); ok {
		return "file:" + c.resolvePath(p)
	}
	return ref
}

// buildAttestors composes the chain in file order. It also returns the
// readiness checks of attestors whose trust material is fetched (OIDC keys,
// SPIFFE Workload API), and the spiffe attestor (nil when none), which also
// serves the proxy_tls listener's TLS.
func (c *Config) buildAttestors(ctx context.Context, m *intercept.Metrics, roots *x509.CertPool, clock broker.Clock, offline bool) (broker.Attestor, []func() bool, *attest.SPIFFE, Problems) {
	var ps Problems
	var named []attest.Named
	var ready []func() bool
	var spiffe *attest.SPIFFE
	for i, a := range c.Attestors {
		var at broker.Attestor
		var err error
		switch a.Type {
		case "cidr":
			entries := make([]attest.CIDREntry, 0, len(a.Identities))
			for _, id := range a.Identities {
				entries = append(entries, attest.CIDREntry{ID: id.ID, CIDRs: mustPrefixes(id.CIDRs)})
			}
			at, err = attest.NewCIDR(entries)
		case "oidc":
			name := a.Name
			if name == "" {
				name = a.Type
			}
			var o *attest.OIDC
			o, err = attest.NewOIDC(ctx, attest.OIDCOptions{
				Name: name, Issuer: a.Issuer, Audiences: a.Audiences, Algorithms: a.Algorithms,
				HTTPClient: ownClient(roots), Clock: clock, Offline: offline,
			})
			if err == nil && o != nil {
				at = o
				ready = append(ready, o.Ready)
			}
			if o == nil && err == nil {
				continue // offline: options checked, nothing to serve
			}
		case "process":
			at, err = attest.NewProcess(attest.ProcessOptions{Clock: clock})
		case "spiffe":
			o := attest.SPIFFEOptions{
				TrustDomain: a.TrustDomain, Bundle: a.Bundle, Socket: a.Socket,
				Audiences: a.Audiences, Clock: clock, Offline: offline,
			}
			if a.Bundle != spiffeWorkloadAPI {
				o.Bundle = c.resolvePath(a.Bundle)
				if a.SVID != nil {
					o.SVIDCert, o.SVIDKey = c.resolvePath(a.SVID.Cert), c.resolvePath(a.SVID.Key)
				}
			}
			var sp *attest.SPIFFE
			if sp, err = attest.NewSPIFFE(ctx, o); err == nil && sp == nil {
				continue // offline: options checked, nothing to serve
			}
			if err == nil {
				at, spiffe = sp, sp
				ready = append(ready, sp.Ready)
			}
		default:
			continue // validate reported it
		}
		if err != nil {
			ps = append(ps, c.problem(err.Error(), "attestors", i))
			continue
		}
		// The chain names failures by method, which is what the
		// keygate_attestation_failures_total{method} label promises.
		named = append(named, attest.Named{Name: a.Type, Attestor: at})
	}
	return attest.NewChain(func(method string) { m.AttestFailures.WithLabelValues(method).Inc() }, named...), ready, spiffe, ps
}

// DefaultDelegationHeader carries the on-behalf-of user token.
const DefaultDelegationHeader = "X-Keygate-On-Behalf-Of"

// buildDelegation verifies user tokens against the delegation issuers. It
// returns a nil interface (not a typed nil) when delegation is off.
func (c *Config) buildDelegation(ctx context.Context, roots *x509.CertPool, clock broker.Clock, offline bool) (intercept.Delegator, []func() bool, Problems) {
	d := c.Delegation
	if d == nil {
		return nil, nil, nil
	}
	var ps Problems
	var verifiers []*attest.OIDC
	var ready []func() bool
	for i, is := range d.Issuers {
		name := is.Name
		if name == "" {
			name = fmt.Sprintf("delegation-%d", i+1)
		}
		o, err := attest.NewOIDC(ctx, attest.OIDCOptions{Name: name, Issuer: is.Issuer, Audiences: is.Audiences,
			Algorithms: is.Algorithms, HTTPClient: ownClient(roots), Clock: clock, Offline: offline})
		if err != nil {
			ps = append(ps, c.problem(err.Error(), "delegation", "issuers", i))
			continue
		}
		if o == nil {
			continue // offline: options checked
		}
		verifiers = append(verifiers, o)
		ready = append(ready, o.Ready)
	}
	header := d.Header
	if header == "" {
		header = DefaultDelegationHeader
	}
	if len(ps) > 0 || len(verifiers) == 0 {
		return nil, nil, ps
	}
	del, err := attest.NewDelegation(header, verifiers)
	if err != nil {
		return nil, nil, Problems{c.problem(err.Error(), "delegation")}
	}
	return del, ready, nil
}

// ownClient is the HTTP client for the broker's own calls (OIDC discovery
// and keys): never an environment proxy, verified TLS, bounded time, and no
// redirects followed.
func ownClient(roots *x509.CertPool) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Proxy:               nil,
			TLSClientConfig:     &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: 5 * time.Second,
			MaxIdleConnsPerHost: 2,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// Run serves until ctx ends, then shuts down gracefully.
func (rt *Runtime) Run(ctx context.Context) error {
	if c := rt.reload.cfg; c != nil && c.Path != "" && !c.embedded {
		wctx, stop := context.WithCancel(ctx)
		defer stop()
		if err := rt.watch(wctx); err != nil {
			rt.log.Warn("config changes will not be picked up automatically; send SIGHUP to reload", zap.Error(err))
		}
	}
	errc := make(chan error, 4+len(rt.Databases))
	for _, v := range rt.vaults {
		v.Start(ctx) // log in now, so /readyz turns ready before the first request
	}
	go func() { errc <- rt.Proxy.Serve(rt.proxyLn) }()
	if rt.transparentLn != nil {
		go func() { errc <- rt.Proxy.ServeTransparent(rt.transparentLn) }()
	}
	if rt.ProxyTLS != nil {
		go func() { errc <- rt.ProxyTLS.Serve(rt.proxyTLSServe) }()
	}
	for i, db := range rt.Databases {
		ln := rt.dbLns[i]
		rt.log.Info("database listener serving", zap.String("listener", db.Listener()), zap.Stringer("addr", ln.Addr()))
		go func() {
			if err := db.Serve(ln); err != nil && !errors.Is(err, dbproxy.ErrServerClosed) {
				errc <- fmt.Errorf("config: %s: %w", db.Listener(), err)
			}
		}()
	}
	if rt.adminLn != nil {
		rt.admin = &http.Server{
			Handler:           intercept.AdminHandler(rt.Registry, rt.readyFlag),
			ReadHeaderTimeout: 5 * time.Second,
		}
		go func() {
			if err := rt.admin.Serve(rt.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("config: admin: %w", err)
			}
		}()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if rt.admin != nil {
		_ = rt.admin.Shutdown(sctx)
	}
	if rt.transparentLn != nil {
		_ = rt.transparentLn.Close()
	}
	// Database sessions get the same budget as the proxies, in parallel:
	// open sessions run until sctx ends, then are ended with FATAL 57P01.
	dbDone := make(chan struct{})
	go func() {
		defer close(dbDone)
		var wg sync.WaitGroup
		for _, db := range rt.Databases {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if serr := db.Shutdown(sctx); serr != nil {
					rt.log.Warn("database sessions still open at the shutdown deadline were ended", zap.String("listener", db.Listener()))
				}
			}()
		}
		wg.Wait()
	}()
	if serr := rt.Proxy.Shutdown(sctx); err == nil && serr != nil && !errors.Is(serr, context.DeadlineExceeded) {
		err = serr
	}
	if rt.ProxyTLS != nil {
		if serr := rt.ProxyTLS.Shutdown(sctx); err == nil && serr != nil && !errors.Is(serr, context.DeadlineExceeded) {
			err = serr
		}
	}
	<-dbDone
	if rt.demo != nil {
		rt.demo.close()
	}
	rt.stopAttestors()
	// Its own budget: the requests that held leases are done (or cut off)
	// by now, and revocations must not be skipped because the listeners
	// used up sctx.
	cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
	rt.closeCredentials(cctx)
	ccancel()
	return err
}

// closeCredentials revokes what the credential sources hold, once no
// request uses them: cached Vault leases first, then each Vault
// connection's own login token (which also revokes any lease left).
func (rt *Runtime) closeCredentials(ctx context.Context) {
	st := &rt.reload
	st.mu.Lock()
	closers := st.closers
	st.closers = nil
	st.mu.Unlock()
	closeAll(ctx, rt.log, "a credential cache", closers)
	vs := make([]inject.Closer, 0, len(rt.vaults))
	for _, v := range rt.vaults {
		vs = append(vs, v)
	}
	closeAll(ctx, rt.log, "a vault connection", vs)
}

func (rt *Runtime) closeListeners() {
	for _, ln := range append([]net.Listener{rt.proxyLn, rt.adminLn, rt.proxyTLSLn, rt.transparentLn}, rt.dbLns...) {
		if ln != nil {
			_ = ln.Close()
		}
	}
	if rt.demo != nil {
		rt.demo.close()
	}
	if rt.stopAttestors != nil {
		rt.stopAttestors()
	}
	for _, v := range rt.vaults {
		_ = v.Close(context.Background()) // not logged in yet: nothing to revoke
	}
}
