package config

import (
	"context"
	"crypto/x509"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/rules"
)

// credentialKeys are the keys each source accepts (besides source and
// cache); any other key set on a credential is an error, never ignored.
var credentialKeys = map[string][]string{
	"static": {"value", "values"},
	"aws_sts": {"role_arn", "duration", "region", "endpoint", "external_id", "source_identity",
		"session_policy", "session_tags", "web_identity", "timeout"},
	"vault_kv":      {"vault", "path", "field", "fields", "version", "kv_version"},
	"vault_dynamic": {"vault", "path", "field", "fields"},
	"oauth2": {"token_url", "client_id", "client_secret", "auth_method", "private_key",
		"scopes", "scopes_expr", "audience", "resource", "timeout"},
	"github_app": {"app_id", "private_key", "api_url", "installation_id", "repositories",
		"permissions", "timeout"},
}

// usedKeys lists the YAML keys of cr that are set.
func usedKeys(cr Credential) []string {
	var keys []string
	v := reflect.ValueOf(cr)
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		tag := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "source" || tag == "cache" {
			continue
		}
		if !v.Field(i).IsZero() {
			keys = append(keys, tag)
		}
	}
	sort.Strings(keys)
	return keys
}

// checkKeys reports keys the source does not take.
func checkKeys(cr Credential, add func(msg string, path ...any)) {
	allowed := credentialKeys[cr.Source]
	for _, k := range usedKeys(cr) {
		ok := false
		for _, a := range allowed {
			ok = ok || a == k
		}
		if !ok {
			add(fmt.Sprintf("%s does not take %s (it takes %s and cache)", cr.Source, k, strings.Join(allowed, ", ")), k)
		}
	}
}

var awsRegion = regexp.MustCompile(`^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-[0-9]+$`)

// stsDuration parses duration ("" is the default).
func stsDuration(s string) (time.Duration, error) {
	if s == "" {
		return inject.DefaultSTSDuration, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("duration %q is not a duration like 15m or 1h", s)
	}
	if d < inject.MinSTSDuration || d > inject.MaxSTSDuration {
		return 0, fmt.Errorf("duration %s is outside STS's range 15m-12h", d)
	}
	return d, nil
}

func (c *Config) validateSTS(cr Credential, add func(msg string, path ...any)) {
	if cr.RoleARN == "" {
		add("aws_sts needs role_arn", "role_arn")
	} else if err := inject.ValidateRoleARN(cr.RoleARN); err != nil {
		add(err.Error(), "role_arn")
	}
	if _, err := stsDuration(cr.Duration); err != nil {
		add(err.Error(), "duration")
	}
	if cr.Region != "" && !awsRegion.MatchString(cr.Region) {
		add(fmt.Sprintf("region %q is not an AWS region like us-east-1", cr.Region), "region")
	}
	if cr.Endpoint != "" {
		if err := checkEndpoint(cr.Endpoint); err != nil {
			add("endpoint "+err.Error(), "endpoint")
		}
	}
	if cr.SessionPolicy != "" {
		if _, err := rules.CompileValue(cr.SessionPolicy, rules.ValueJSON, rules.Options{}); err != nil {
			add("session_policy: "+err.Error(), "session_policy")
		}
	}
	for k, expr := range cr.SessionTags {
		if k == "" || len(k) > 128 || strings.Trim(k, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/=+-@") != "" {
			add(fmt.Sprintf("session_tags: key %q must be 1-128 characters of letters, digits and _.:/=+-@", k), "session_tags", k)
		}
		if _, err := rules.CompileValue(expr, rules.ValueString, rules.Options{}); err != nil {
			add(fmt.Sprintf("session_tags.%s: %v", k, err), "session_tags", k)
		}
	}
	if len(cr.SessionTags) > 50 {
		add("session_tags: STS accepts at most 50 tags", "session_tags")
	}
	if w := cr.WebIdentity; w != nil {
		switch {
		case (w.TokenFile == "") == (w.JWTSVID == nil):
			add("web_identity needs exactly one of token_file or jwt_svid", "web_identity")
		case w.JWTSVID != nil && w.JWTSVID.Audience == "":
			add("web_identity.jwt_svid needs an audience (sts.amazonaws.com for AWS)", "web_identity", "jwt_svid")
		}
		if len(cr.SessionTags) > 0 {
			add("session_tags cannot be set with web_identity: STS takes the tags from the token", "session_tags")
		}
		if cr.SourceIdentity != nil && *cr.SourceIdentity {
			add("source_identity cannot be set with web_identity: STS takes it from the token", "source_identity")
		}
		if cr.ExternalID != "" {
			add("external_id applies to AssumeRole only, not web_identity", "external_id")
		}
	}
}

// checkEndpoint wants https, or http for a loopback test endpoint.
func checkEndpoint(s string) error {
	return inject.CheckServiceURL(s, "an endpoint URL", "on loopback")
}

// sourceEnv is what building a source may need beyond its own entry.
type sourceEnv struct {
	ctx     context.Context
	clock   broker.Clock
	metrics *inject.Metrics
	roots   *x509.CertPool // nil: system roots
	spiffe  string         // the spiffe attestor's Workload API socket, if any
}

func (c *Config) buildSTS(env sourceEnv, name string, cr Credential) (broker.Source, error) {
	dur, err := stsDuration(cr.Duration)
	if err != nil {
		return nil, err
	}
	o := inject.STSOptions{
		RoleARN:        cr.RoleARN,
		Duration:       dur,
		Region:         cr.Region,
		Endpoint:       cr.Endpoint,
		ExternalID:     cr.ExternalID,
		SourceIdentity: cr.WebIdentity == nil && (cr.SourceIdentity == nil || *cr.SourceIdentity),
		HTTPClient:     ownClient(env.roots),
		Timeout:        time.Duration(cr.Timeout),
	}
	if w := cr.WebIdentity; w != nil {
		if w.TokenFile != "" {
			o.WebIdentity = inject.FileToken(c.resolvePath(w.TokenFile))
		} else {
			sock := w.JWTSVID.Socket
			if sock == "" {
				sock = env.spiffe
			}
			o.WebIdentity = inject.JWTSVIDToken{Addr: sock, Audience: w.JWTSVID.Audience}
		}
	}
	src, err := inject.NewSTS(env.ctx, name, o)
	if err != nil {
		return nil, err
	}
	ttl, _ := parseCache(cr.Cache)
	src = inject.NewCache(name, src, inject.CacheOptions{TTL: ttl, Clock: env.clock, Metrics: env.metrics})
	derive, err := stsParams(cr, env.clock)
	if err != nil {
		return nil, err
	}
	if derive != nil {
		// Outside the cache: the derived policy and tags are part of its key.
		src = inject.WithParams(src, derive)
	}
	return src, nil
}

// stsParams compiles session_policy and session_tags into one function that
// computes the grant parameters for a request; nil when there are none.
func stsParams(cr Credential, clock broker.Clock) (func(context.Context, broker.Identity, broker.Target) (map[string]string, error), error) {
	opts := rules.Options{Clock: clock}
	var policy *rules.Value
	if cr.SessionPolicy != "" {
		v, err := rules.CompileValue(cr.SessionPolicy, rules.ValueJSON, opts)
		if err != nil {
			return nil, fmt.Errorf("session_policy: %w", err)
		}
		policy = v
	}
	tags := map[string]*rules.Value{}
	for k, expr := range cr.SessionTags {
		v, err := rules.CompileValue(expr, rules.ValueString, opts)
		if err != nil {
			return nil, fmt.Errorf("session_tags.%s: %w", k, err)
		}
		tags[k] = v
	}
	if policy == nil && len(tags) == 0 {
		return nil, nil
	}
	return func(ctx context.Context, id broker.Identity, t broker.Target) (map[string]string, error) {
		out := make(map[string]string, len(tags)+1)
		if policy != nil {
			p, err := policy.Eval(ctx, id, t)
			if err != nil {
				return nil, fmt.Errorf("session_policy: %w", err)
			}
			out[inject.ParamSessionPolicy] = p
		}
		for k, v := range tags {
			s, err := v.Eval(ctx, id, t)
			if err != nil {
				return nil, fmt.Errorf("session_tags.%s: %w", k, err)
			}
			out[inject.ParamTagPrefix+k] = s
		}
		return out, nil
	}, nil
}

// buildSigV4 builds the sigv4 injector of a rule.
func buildSigV4(as *SigV4As, clock broker.Clock) (broker.Injector, error) {
	o := inject.SigV4Options{Clock: clock}
	if as != nil {
		o.Service, o.Region, o.MaxBody = as.Service, as.Region, as.MaxBody
	}
	return inject.SigV4(o)
}

// spiffeSocket is the Workload API address of the spiffe attestor ("" when
// none is configured, or it uses the default SPIFFE_ENDPOINT_SOCKET).
func (c *Config) spiffeSocket() string {
	a := c.spiffeAttestor()
	if a == nil || a.Socket == "" {
		return ""
	}
	if strings.HasPrefix(a.Socket, "/") {
		return "unix://" + a.Socket
	}
	return a.Socket
}
