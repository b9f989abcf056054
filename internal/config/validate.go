package config

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
)

// validate checks what can be checked without building anything.
func (c *Config) validate() Problems {
	ps := append(Problems(nil), c.decodeProblems...)
	add := func(msg string, path ...any) { ps = append(ps, c.problem(msg, path...)) }

	if c.Listen.Proxy == "" {
		add("listen.proxy is required (for example 127.0.0.1:15080)", "listen")
	} else if path, ok := strings.CutPrefix(c.Listen.Proxy, "unix:"); ok {
		if path == "" {
			add("listen.proxy: unix: needs a socket path", "listen", "proxy")
		}
	} else if err := checkListenAddr(c.Listen.Proxy); err != nil {
		add("listen.proxy: "+err.Error(), "listen", "proxy")
	}
	if c.Listen.Admin != "" {
		if err := checkListenAddr(c.Listen.Admin); err != nil {
			add("listen.admin: "+err.Error(), "listen", "admin")
		}
	}
	if c.Listen.ProxyTLS != "" {
		if err := checkListenAddr(c.Listen.ProxyTLS); err != nil {
			add("listen.proxy_tls: "+err.Error(), "listen", "proxy_tls")
		}
		if sp := c.spiffeAttestor(); sp == nil {
			add("listen.proxy_tls needs a spiffe attestor (its trust domain authenticates the clients and provides the broker's certificate)", "listen", "proxy_tls")
		} else if sp.Bundle != spiffeWorkloadAPI && sp.Bundle != "" && sp.SVID == nil {
			add("listen.proxy_tls: the spiffe attestor's bundle is a file, so it needs svid: {cert, key} (the broker's own X509-SVID)", "listen", "proxy_tls")
		}
	}
	if c.Listen.Transparent != "" {
		if err := checkListenAddr(c.Listen.Transparent); err != nil {
			add("listen.transparent: "+err.Error(), "listen", "transparent")
		}
	}

	switch {
	case c.CA.Ephemeral && (c.CA.Cert != "" || c.CA.Key != ""):
		add("ca: set either ephemeral or cert and key, not both", "ca")
	case !c.CA.Ephemeral && (c.CA.Cert == "" || c.CA.Key == ""):
		add("ca: cert and key are required (or ephemeral: true)", "ca")
	case !c.CA.Ephemeral && c.CA.CertOut != "":
		add("ca.cert_out only applies to an ephemeral CA", "ca", "cert_out")
	}
	if d := time.Duration(c.CA.LeafLifetime); d > 24*time.Hour {
		add("ca.leaf_lifetime must be at most 24h", "ca", "leaf_lifetime")
	}
	if c.CA.LeafCacheSize < 0 {
		add("ca.leaf_cache_size must not be negative", "ca", "leaf_cache_size")
	}

	if len(c.Attestors) == 0 {
		add("attestors: at least one attestor is required; without one every caller is refused", "attestors")
	}
	for i, a := range c.Attestors {
		if a.Type != "spiffe" && (a.Socket != "" || a.SVID != nil) {
			add("attestors: socket and svid apply only to spiffe", "attestors", i)
		}
		switch a.Type {
		case "cidr":
			if a.TrustDomain != "" || a.Bundle != "" || a.Issuer != "" || len(a.Audiences) > 0 || len(a.Algorithms) > 0 {
				add("attestors: cidr takes only name and identities", "attestors", i)
			}
			if len(a.Identities) == 0 {
				add("attestors: cidr needs identities", "attestors", i)
			}
			for j, id := range a.Identities {
				if id.ID == "" {
					add("attestors: cidr identity needs an id", "attestors", i, "identities", j)
				}
				for k, s := range id.CIDRs {
					if _, err := netip.ParsePrefix(s); err != nil {
						add(fmt.Sprintf("attestors: %q is not a CIDR prefix", s), "attestors", i, "identities", j, "cidrs", k)
					}
				}
			}
		case "oidc":
			if a.TrustDomain != "" || a.Bundle != "" || len(a.Identities) > 0 {
				add("attestors: oidc takes only name, issuer, audiences and algorithms", "attestors", i)
			}
			if err := checkIssuer(a.Issuer); err != nil {
				add("attestors: oidc issuer: "+err.Error(), "attestors", i, "issuer")
			}
			if len(a.Audiences) == 0 {
				add("attestors: oidc needs audiences (the aud your tokens are minted for, e.g. keygate)", "attestors", i)
			}
			for j, alg := range a.Algorithms {
				if !allowedAlgs[alg] {
					add(fmt.Sprintf("attestors: oidc algorithm %q is not allowed (use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512 or EdDSA)", alg), "attestors", i, "algorithms", j)
				}
			}
		case "process":
			if a.TrustDomain != "" || a.Bundle != "" || a.Issuer != "" || len(a.Audiences) > 0 || len(a.Identities) > 0 || len(a.Algorithms) > 0 {
				add("attestors: process takes only name", "attestors", i)
			}
		case "spiffe":
			ps = append(ps, c.validateSPIFFE(i, a)...)
		case "":
			add("attestors: type is required", "attestors", i)
		default:
			add(fmt.Sprintf("attestors: unknown type %q (want spiffe, oidc, process or cidr)", a.Type), "attestors", i, "type")
		}
	}
	names := map[string]int{}
	for i, a := range c.Attestors {
		if a.Name == "" {
			continue
		}
		n := a.Name
		if first, dup := names[n]; dup {
			add(fmt.Sprintf("attestors: name %q is used twice (first at entry %d); give each attestor its own name", n, first+1), "attestors", i)
		} else {
			names[n] = i
		}
	}
	if d := c.Delegation; d != nil {
		if d.Header != "" && !validHeaderName(d.Header) {
			add(fmt.Sprintf("delegation.header %q is not a header name", d.Header), "delegation", "header")
		}
		if len(d.Issuers) == 0 {
			add("delegation.issuers: at least one issuer is required", "delegation")
		}
		for i, is := range d.Issuers {
			if err := checkIssuer(is.Issuer); err != nil {
				add("delegation.issuers: issuer: "+err.Error(), "delegation", "issuers", i, "issuer")
			}
			if len(is.Audiences) == 0 {
				add("delegation.issuers: audiences are required", "delegation", "issuers", i)
			}
			for j, alg := range is.Algorithms {
				if !allowedAlgs[alg] {
					add(fmt.Sprintf("delegation.issuers: algorithm %q is not allowed", alg), "delegation", "issuers", i, "algorithms", j)
				}
			}
		}
	}
	ps = append(ps, c.validateVaults()...)
	ps = append(ps, c.validateDatabases()...)

	for i, s := range c.Egress.AllowCIDRs {
		if _, err := netip.ParsePrefix(s); err != nil {
			add(fmt.Sprintf("egress.allow_cidrs: %q is not a CIDR prefix", s), "egress", "allow_cidrs", i)
		}
	}
	for i, p := range c.Egress.ConnectPorts {
		if p < 1 || p > 65535 {
			add(fmt.Sprintf("egress.connect_ports: %d is not a port", p), "egress", "connect_ports", i)
		}
	}
	if c.Limits.MaxHeaderBytes < 0 {
		add("limits.max_header_bytes must not be negative", "limits", "max_header_bytes")
	}
	for _, l := range []struct {
		key string
		v   *int
	}{
		{"max_header_count", c.Limits.MaxHeaderCount}, {"max_tunnels", c.Limits.MaxTunnels},
		{"leaf_mints_per_second", c.Limits.LeafMintsPerSecond},
	} {
		if l.v != nil && *l.v <= 0 {
			add(fmt.Sprintf("limits.%s must be positive (leave it out for the default)", l.key), "limits", l.key)
		}
	}

	for name, cr := range c.Credentials {
		ps = append(ps, c.validateCredential(name, cr)...)
	}
	for i, r := range c.Rules {
		if r.Inject == nil {
			continue
		}
		// An empty name is reported by the rule compiler.
		cr, ok := c.Credentials[r.Inject.Credential]
		if r.Inject.Credential != "" && !ok {
			add(fmt.Sprintf("rule %q: credential %q is not defined under credentials", r.Name, r.Inject.Credential), "rules", i, "inject", "credential")
		}
		if ok && !r.Inject.As.bad {
			if msg := injectorFits(r.Inject.As.Kind, r.Inject.Credential, cr); msg != "" {
				add(fmt.Sprintf("rule %q: %s", r.Name, msg), "rules", i, "inject", "as")
			}
		}
		if r.Inject.As.Kind == "sigv4" && !r.Inject.As.bad {
			for _, h := range sigv4Uninferable(r.Hosts, r.Inject.As.SigV4) {
				add(fmt.Sprintf("rule %q: as: sigv4 cannot infer the AWS service and region from host %q; set as: {sigv4: {service: ..., region: ...}}", r.Name, h), "rules", i, "inject", "as")
			}
		}
	}
	if c.Demo != nil {
		if err := checkListenAddr(c.Demo.Echo); err != nil {
			add("demo.echo: "+err.Error(), "demo", "echo")
		}
	}
	return ps
}

func (c *Config) validateCredential(name string, cr Credential) Problems {
	var ps Problems
	add := func(msg string, path ...any) {
		ps = append(ps, c.problem(fmt.Sprintf("credential %q: %s", name, msg), append([]any{"credentials", name}, path...)...))
	}
	switch cr.Source {
	case "static":
		if (cr.Value == "") == (len(cr.Values) == 0) {
			add("static needs exactly one of value or values")
		}
		if cr.Value != "" {
			if err := inject.ValidateRef(cr.Value); err != nil {
				add(refHint(err), "value")
			}
		}
		for k, v := range cr.Values {
			if err := inject.ValidateRef(v); err != nil {
				add(fmt.Sprintf("values.%s: %s", k, refHint(err)), "values", k)
			}
		}
		checkKeys(cr, add)
	case "aws_sts":
		c.validateSTS(cr, add)
		checkKeys(cr, add)
	case "vault_kv", "vault_dynamic":
		c.validateVaultSource(cr, add)
		checkKeys(cr, add)
	case "oauth2":
		c.validateOAuth2(cr, add)
		checkKeys(cr, add)
	case "github_app":
		c.validateGitHubApp(cr, add)
		checkKeys(cr, add)
	case "":
		add("source is required")
	default:
		add(fmt.Sprintf("unknown source %q", cr.Source), "source")
	}
	if _, err := parseCache(cr.Cache); err != nil {
		add(err.Error(), "cache")
	}
	return ps
}

func refHint(err error) string {
	return strings.TrimPrefix(err.Error(), "inject: ") + " (secrets are written as env:NAME or file:PATH)"
}

func checkListenAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q is not host:port", a)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && host != "localhost" {
			return fmt.Errorf("%q: listen on an IP address", a)
		}
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return fmt.Errorf("%q: bad port", a)
	}
	return nil
}

// allowedAlgs are the asymmetric JWS algorithms; "none" and HMAC never are.
var allowedAlgs = map[string]bool{
	"RS256": true, "RS384": true, "RS512": true, "PS256": true, "PS384": true, "PS512": true,
	"ES256": true, "ES384": true, "ES512": true, "EdDSA": true,
}

// checkIssuer wants an https URL; plain http only for a loopback issuer
// (local tests and sidecar issuers), since keys fetched in clear could be
// swapped.
func checkIssuer(s string) error {
	if s == "" {
		return fmt.Errorf("is required")
	}
	return inject.CheckServiceURL(s, "an issuer URL", "for a loopback issuer")
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// spiffeWorkloadAPI is the spiffe bundle setting for the Workload API.
const spiffeWorkloadAPI = "workload_api"

// spiffeAttestor is the (single) spiffe attestor, or nil.
func (c *Config) spiffeAttestor() *Attestor {
	for i := range c.Attestors {
		if c.Attestors[i].Type == "spiffe" {
			return &c.Attestors[i]
		}
	}
	return nil
}

func (c *Config) validateSPIFFE(i int, a Attestor) Problems {
	var ps Problems
	add := func(msg string, path ...any) {
		ps = append(ps, c.problem(msg, append([]any{"attestors", i}, path...)...))
	}
	if a.Issuer != "" || len(a.Algorithms) > 0 || len(a.Identities) > 0 {
		add("attestors: spiffe takes only name, trust_domain, bundle, socket, audiences and svid")
	}
	for j, other := range c.Attestors[:i] {
		if other.Type == "spiffe" {
			add(fmt.Sprintf("attestors: only one spiffe attestor is supported (the first is entry %d)", j+1))
			break
		}
	}
	if a.TrustDomain == "" {
		add("attestors: spiffe needs trust_domain (for example example.org)")
	} else if _, err := spiffeid.TrustDomainFromString(a.TrustDomain); err != nil || strings.Contains(a.TrustDomain, "/") {
		add(fmt.Sprintf("attestors: spiffe trust_domain %q is not a trust domain name (write example.org, not spiffe://example.org)", a.TrustDomain), "trust_domain")
	}
	switch a.Bundle {
	case "":
		add("attestors: spiffe needs bundle: workload_api or the path of a trust bundle file")
	case spiffeWorkloadAPI:
		if a.SVID != nil {
			add("attestors: spiffe svid applies only to a bundle file; with workload_api the broker's SVID comes from the Workload API", "svid")
		}
		if a.Socket != "" {
			addr := a.Socket
			if strings.HasPrefix(addr, "/") {
				addr = "unix://" + addr
			}
			if !strings.HasPrefix(addr, "unix://") && !strings.HasPrefix(addr, "tcp://") {
				add(fmt.Sprintf("attestors: spiffe socket %q must be unix:///path, /path or tcp://ip:port", a.Socket), "socket")
			}
		}
	default:
		if a.Socket != "" {
			add("attestors: spiffe socket applies only to bundle: workload_api", "socket")
		}
		if a.SVID != nil && (a.SVID.Cert == "" || a.SVID.Key == "") {
			add("attestors: spiffe svid needs cert and key", "svid")
		}
	}
	for j, aud := range a.Audiences {
		if aud == "" {
			add("attestors: spiffe audiences: empty audience", "audiences", j)
		}
	}
	return ps
}

// injectorFits reports why an injector cannot write a credential: AWS keys
// are only ever written as a SigV4 signature, and a signature needs keys.
func injectorFits(kind, name string, cr Credential) string {
	aws := cr.Source == "aws_sts"
	switch cr.Source {
	case "static":
		_, id := cr.Values[broker.FieldAccessKeyID]
		_, secret := cr.Values[broker.FieldSecretAccessKey]
		aws = id && secret
	case "vault_kv", "vault_dynamic":
		// aws/creds/ROLE (or a KV secret) mapped onto the AWS fields.
		_, id := cr.Fields[broker.FieldAccessKeyID]
		_, secret := cr.Fields[broker.FieldSecretAccessKey]
		aws = id && secret
	}
	if msg := tokenSourceFits(kind, name, cr); msg != "" {
		return msg
	}
	switch {
	case kind == "sigv4" && !aws:
		return fmt.Sprintf("as: sigv4 needs AWS keys, but credential %q (%s) has none (use aws_sts, or static values or vault fields access_key_id and secret_access_key)", name, cr.Source)
	case kind != "sigv4" && kind != "" && cr.Source == "aws_sts":
		return fmt.Sprintf("credential %q is aws_sts: AWS keys are injected only as a signature (as: sigv4), never as %s", name, kind)
	}
	return ""
}

// sigv4Uninferable lists the rule's host patterns for which sigv4 would
// have to guess the service or region: caught at load, not per request. A
// wildcard pattern is checked with a sample first label.
func sigv4Uninferable(hosts []string, as *SigV4As) []string {
	if as != nil && as.Service != "" && as.Region != "" {
		return nil
	}
	var bad []string
	for _, h := range hosts {
		sample := h
		if rest, ok := strings.CutPrefix(h, "*."); ok {
			sample = "bucket." + rest
		}
		svc, _, ok := inject.InferSigV4(sample)
		if !ok || (as != nil && as.Service != "" && svc == "") {
			bad = append(bad, h)
		}
	}
	return bad
}
