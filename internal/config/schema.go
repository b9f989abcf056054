package config

import (
	"fmt"
	"time"

	"gopkg.in/yaml.v3"
)

// File is the whole configuration (DESIGN.md §5). Every key is documented in
// docs/configuration.md.
type File struct {
	Listen      Listen                `yaml:"listen"`
	CA          CA                    `yaml:"ca"`
	Attestors   []Attestor            `yaml:"attestors"`
	Delegation  *Delegation           `yaml:"delegation"`
	Egress      Egress                `yaml:"egress"`
	Vaults      map[string]Vault      `yaml:"vaults"`
	Credentials map[string]Credential `yaml:"credentials"`
	Rules       []Rule                `yaml:"rules"`
	Databases   []Database            `yaml:"databases"`
	Limits      Limits                `yaml:"limits"`
	Demo        *Demo                 `yaml:"demo"`
}

// Listen holds the listener addresses.
type Listen struct {
	Proxy       string `yaml:"proxy"`
	ProxyTLS    string `yaml:"proxy_tls"`
	Transparent string `yaml:"transparent"`
	Admin       string `yaml:"admin"`
}

// CA is the MITM certificate authority: files, or an ephemeral one.
type CA struct {
	Cert          string   `yaml:"cert"`
	Key           string   `yaml:"key"`
	Ephemeral     bool     `yaml:"ephemeral"`
	CertOut       string   `yaml:"cert_out"`
	LeafLifetime  Duration `yaml:"leaf_lifetime"`
	LeafCacheSize int      `yaml:"leaf_cache_size"`
}

// Attestor is one entry of the ordered attestor chain.
type Attestor struct {
	Type        string         `yaml:"type"`
	Name        string         `yaml:"name"`
	TrustDomain string         `yaml:"trust_domain"`
	Bundle      string         `yaml:"bundle"`
	Issuer      string         `yaml:"issuer"`
	Audiences   []string       `yaml:"audiences"`
	Algorithms  []string       `yaml:"algorithms"`
	Identities  []CIDRIdentity `yaml:"identities"`
	Socket      string         `yaml:"socket"` // spiffe: Workload API address
	SVID        *SVIDFiles     `yaml:"svid"`   // spiffe with a bundle file: the broker's own SVID
}

// SVIDFiles are the broker's own X509-SVID and key (PEM), for a spiffe
// attestor whose bundle is a file.
type SVIDFiles struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// CIDRIdentity names a set of source ranges.
type CIDRIdentity struct {
	ID    string   `yaml:"id"`
	CIDRs []string `yaml:"cidrs"`
}

// Delegation configures verified on-behalf-of user tokens.
type Delegation struct {
	Header  string             `yaml:"header"`
	Issuers []DelegationIssuer `yaml:"issuers"`
}

// DelegationIssuer is an OIDC issuer whose user tokens are accepted.
type DelegationIssuer struct {
	Name       string   `yaml:"name"`
	Issuer     string   `yaml:"issuer"`
	Audiences  []string `yaml:"audiences"`
	Algorithms []string `yaml:"algorithms"`
}

// Egress is the SSRF guard and upstream trust.
type Egress struct {
	DenyPrivate  *bool    `yaml:"deny_private"`
	AllowCIDRs   []string `yaml:"allow_cidrs"`
	ConnectPorts []int    `yaml:"connect_ports"`
	CABundle     string   `yaml:"ca_bundle"`
}

// Credential is a named credential source. Which keys apply depends on
// the source; validate reports keys that do not.
type Credential struct {
	Source   string            `yaml:"source"`
	Value    string            `yaml:"value"`
	Values   map[string]string `yaml:"values"`
	Cache    string            `yaml:"cache"`
	Vault    string            `yaml:"vault"`
	Path     string            `yaml:"path"`
	Field    string            `yaml:"field"`
	RoleARN  string            `yaml:"role_arn"`
	Duration string            `yaml:"duration"`

	// vault_kv and vault_dynamic (vault, path and field above)
	Fields    map[string]string `yaml:"fields"`     // credential field -> Vault key
	Version   int               `yaml:"version"`    // vault_kv: KV v2 version pin
	KVVersion int               `yaml:"kv_version"` // vault_kv: 1 or 2; unset: detected

	// aws_sts
	Region         string            `yaml:"region"`
	Endpoint       string            `yaml:"endpoint"`
	ExternalID     string            `yaml:"external_id"`
	SourceIdentity *bool             `yaml:"source_identity"`
	SessionPolicy  string            `yaml:"session_policy"`
	SessionTags    map[string]string `yaml:"session_tags"`
	WebIdentity    *WebIdentity      `yaml:"web_identity"`
	Timeout        Duration          `yaml:"timeout"` // also oauth2 and github_app

	// oauth2 (oauth.go)
	TokenURL     string     `yaml:"token_url"`
	ClientID     string     `yaml:"client_id"`
	ClientSecret *SecretRef `yaml:"client_secret"`
	AuthMethod   string     `yaml:"auth_method"`
	Scopes       []string   `yaml:"scopes"`
	ScopesExpr   string     `yaml:"scopes_expr"`
	Audience     string     `yaml:"audience"`
	Resource     string     `yaml:"resource"`
	PrivateKey   *SecretRef `yaml:"private_key"` // also github_app

	// github_app (oauth.go)
	AppID          string      `yaml:"app_id"`
	APIURL         string      `yaml:"api_url"`
	InstallationID int64       `yaml:"installation_id"`
	Repositories   *ListOrExpr `yaml:"repositories"`
	Permissions    *MapOrExpr  `yaml:"permissions"`
}

// Vault is one vaults: entry, a Vault server the broker logs in to.
type Vault struct {
	Address   string    `yaml:"address"`
	CABundle  string    `yaml:"ca_bundle"`
	Namespace string    `yaml:"namespace"`
	Timeout   Duration  `yaml:"timeout"`
	UseEnv    bool      `yaml:"use_env"`
	Auth      VaultAuth `yaml:"auth"`
}

// VaultAuth is the broker's own Vault login.
type VaultAuth struct {
	Method       string      `yaml:"method"` // jwt, kubernetes, approle, token_file
	Mount        string      `yaml:"mount"`
	Role         string      `yaml:"role"`
	TokenFile    string      `yaml:"token_file"`
	JWTSVID      *JWTSVIDRef `yaml:"jwt_svid"`
	RoleIDFile   string      `yaml:"role_id_file"`
	SecretIDFile string      `yaml:"secret_id_file"`
	// ChildTokenTTL (token_file only): work under a child token of this
	// TTL, this process's own (revoked at shutdown, gone at its TTL after a
	// crash).
	ChildTokenTTL Duration `yaml:"child_token_ttl"`
}

// WebIdentity is the broker's own token for AssumeRoleWithWebIdentity:
// exactly one of a token file or a JWT-SVID from the Workload API.
type WebIdentity struct {
	TokenFile string      `yaml:"token_file"`
	JWTSVID   *JWTSVIDRef `yaml:"jwt_svid"`
}

// JWTSVIDRef asks the Workload API for the broker's JWT-SVID.
type JWTSVIDRef struct {
	Audience string `yaml:"audience"`
	Socket   string `yaml:"socket"` // "": the spiffe attestor's socket, else SPIFFE_ENDPOINT_SOCKET
}

// Rule is one ordered policy rule.
type Rule struct {
	Name           string   `yaml:"name"`
	Hosts          []string `yaml:"hosts"`
	Ports          []int    `yaml:"ports"`
	When           string   `yaml:"when"`
	Action         string   `yaml:"action"`
	Inject         *Inject  `yaml:"inject"`
	AllowPlaintext bool     `yaml:"allow_plaintext"`
	AllowAnonymous bool     `yaml:"allow_anonymous"`
}

// Inject names the credential and how it is written.
type Inject struct {
	Credential string   `yaml:"credential"`
	As         InjectAs `yaml:"as"`
}

// InjectAs is "bearer" | "basic" | "sigv4" | {header: {name, format}} |
// {query: {name}} | {sigv4: {service, region, max_body}}.
type InjectAs struct {
	Kind   string
	Header *HeaderAs
	Query  *QueryAs
	SigV4  *SigV4As
	line   int
	bad    bool // decoding failed and was reported; build nothing more
}

// HeaderAs writes a named header from a format.
type HeaderAs struct {
	Name   string `yaml:"name"`
	Format string `yaml:"format"`
}

// QueryAs writes a query parameter.
type QueryAs struct {
	Name string `yaml:"name"`
}

// SigV4As re-signs the request with AWS Signature Version 4. Service and
// region are inferred from the host when empty; MaxBody bounds the body
// buffered to hash it (bytes; 0: the default).
type SigV4As struct {
	Service string `yaml:"service"`
	Region  string `yaml:"region"`
	MaxBody int64  `yaml:"max_body"`
}

// UnmarshalYAML accepts the scalar and mapping forms, strictly.
func (a *InjectAs) UnmarshalYAML(n *yaml.Node) error {
	a.line = n.Line
	err := a.decode(n)
	a.bad = err != nil
	return err
}

func (a *InjectAs) decode(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		a.Kind = n.Value
		return nil
	case yaml.MappingNode:
		if len(n.Content) != 2 {
			return typeErr("line %d: inject.as takes exactly one of header, query, sigv4", n.Line)
		}
		key, val := n.Content[0], n.Content[1]
		switch key.Value {
		case "header":
			a.Kind, a.Header = "header", &HeaderAs{}
			return decodeStrict(val, a.Header)
		case "query":
			a.Kind, a.Query = "query", &QueryAs{}
			return decodeStrict(val, a.Query)
		case "sigv4":
			a.Kind, a.SigV4 = "sigv4", &SigV4As{}
			return decodeStrict(val, a.SigV4)
		}
		return typeErr("line %d: inject.as: unknown form %q (want bearer, basic, sigv4, header or query)", key.Line, key.Value)
	}
	return typeErr("line %d: inject.as must be a name or a mapping", n.Line)
}

// decodeStrict decodes a sub-node rejecting unknown keys, which
// yaml.Node.Decode alone does not do.
func decodeStrict(n *yaml.Node, out any) error {
	for i := 0; n.Kind == yaml.MappingNode && i+1 < len(n.Content); i += 2 {
		if err := knownKey(out, n.Content[i].Value); err != nil {
			return typeErr("line %d: inject.as: %v", n.Content[i].Line, err)
		}
	}
	return n.Decode(out)
}

func knownKey(out any, key string) error {
	var ok bool
	want := ""
	switch out.(type) {
	case *HeaderAs:
		ok, want = key == "name" || key == "format", "header takes name and format"
	case *QueryAs:
		ok, want = key == "name", "query takes name"
	case *SigV4As:
		ok, want = key == "service" || key == "region" || key == "max_body", "sigv4 takes service, region and max_body"
	}
	if !ok {
		return fmt.Errorf("unknown key %q (%s)", key, want)
	}
	return nil
}

// Database is one databases: entry: a PostgreSQL listener whose sessions
// the broker authenticates upstream with a credential (docs/postgres.md).
type Database struct {
	Name       string `yaml:"name"`
	Listen     string `yaml:"listen"`     // host:port or unix:PATH
	Upstream   string `yaml:"upstream"`   // host:port of the real server
	Credential string `yaml:"credential"` // a credentials: name with username and password
	// TLS of the upstream leg: disable, require or verify-full (default).
	TLS string `yaml:"tls"`
	// CABundle replaces the roots verify-full trusts (default: the egress
	// roots, i.e. the system roots plus egress.ca_bundle).
	CABundle string `yaml:"ca_bundle"`
	// ServerName is the name verify-full checks (default: the upstream's host).
	ServerName string `yaml:"server_name"`
	// ServerTLS offers clients TLS with a broker-CA leaf (default true).
	ServerTLS        *bool `yaml:"server_tls"`
	AllowOptions     bool  `yaml:"allow_options"`
	AllowReplication bool  `yaml:"allow_replication"`
	// RDSIAM logs in with an RDS IAM authentication token minted per
	// session from credential (then an aws_sts one) instead of a password.
	RDSIAM *DatabaseRDSIAM `yaml:"rds_iam"`
}

// DatabaseRDSIAM is a databases: entry's rds_iam: the database user the
// token logs in as, and the database's region (default: the aws_sts
// credential's region, when it sets one).
type DatabaseRDSIAM struct {
	User   string `yaml:"user"`
	Region string `yaml:"region"`
}

// Limits bound what one workload connection can cost.
type Limits struct {
	ReadHeaderTimeout Duration `yaml:"read_header_timeout"`
	IdleTimeout       Duration `yaml:"idle_timeout"`
	HandshakeTimeout  Duration `yaml:"handshake_timeout"`
	UpstreamTimeout   Duration `yaml:"upstream_timeout"`
	ResolveTimeout    Duration `yaml:"resolve_timeout"` // default 2s (egress.DefaultResolveTimeout)
	MaxHeaderBytes    int      `yaml:"max_header_bytes"`
	// The caps below have no "off": absent means the default, and 0 or a
	// negative value is a config error (a cap of 0 would refuse everything).
	MaxHeaderCount     *int `yaml:"max_header_count"`      // default 200
	MaxTunnels         *int `yaml:"max_tunnels"`           // default 2048
	LeafMintsPerSecond *int `yaml:"leaf_mints_per_second"` // per caller identity; default 50 (burst the same)
}

// positive is *v, or 0 (the intercept default) when absent.
func positive(v *int) int {
	if v == nil {
		return 0
	}
	return *v
}

// Demo runs a built-in HTTPS echo upstream for trying keygate. Never enable
// it in production.
type Demo struct {
	Echo string `yaml:"echo"`
}

// Duration is a time.Duration written as "90s", "5m".
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil || v < 0 {
		return typeErr("line %d: %q is not a duration (like 30s or 5m)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// typeErr reports a problem the way yaml.v3 collects them, so decoding goes
// on and every problem in the file is reported, not just the first.
func typeErr(format string, args ...any) error {
	return &yaml.TypeError{Errors: []string{fmt.Sprintf(format, args...)}}
}
