package config

import (
	"context"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/rules"
)

// The oauth2 and github_app credential sources: their YAML forms,
// validation (every problem at its line) and building.

// SecretRef is a secret the broker itself holds, written either as a
// reference (env:NAME, file:PATH) or as another credential:
// {credential: NAME, field: FIELD} (a vault_kv or static credential;
// field defaults to token).
type SecretRef struct {
	Ref        string
	Credential string
	Field      string
}

// UnmarshalYAML accepts a scalar reference or {credential, field}. A
// scalar is never repeated in an error: it may be a pasted secret.
func (s *SecretRef) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		s.Ref = n.Value
		return nil
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if v.Kind != yaml.ScalarNode {
				return typeErr("line %d: %s must be a name", v.Line, k.Value)
			}
			switch k.Value {
			case "credential":
				s.Credential = v.Value
			case "field":
				s.Field = v.Value
			default:
				return typeErr("line %d: unknown key %q (a secret is env:NAME, file:PATH or {credential: NAME, field: FIELD})", k.Line, k.Value)
			}
		}
		return nil
	}
	return typeErr("line %d: a secret is env:NAME, file:PATH or {credential: NAME, field: FIELD}", n.Line)
}

// ListOrExpr is a YAML list of literal strings, or one string holding a CEL
// expression that yields a list of strings (or a space-separated string).
type ListOrExpr struct {
	List []string
	Expr string
}

// UnmarshalYAML accepts a sequence of scalars or a scalar expression.
func (l *ListOrExpr) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		l.Expr = n.Value
		return nil
	case yaml.SequenceNode:
		for _, e := range n.Content {
			if e.Kind != yaml.ScalarNode {
				return typeErr("line %d: list entries must be strings", e.Line)
			}
			l.List = append(l.List, e.Value)
		}
		if l.List == nil {
			l.List = []string{}
		}
		return nil
	}
	return typeErr("line %d: want a list of names or a CEL expression (a string)", n.Line)
}

// MapOrExpr is a YAML mapping of literal strings, or one string holding a
// CEL expression that yields a map of strings.
type MapOrExpr struct {
	Map  map[string]string
	Expr string
}

// UnmarshalYAML accepts a mapping of scalars or a scalar expression.
func (m *MapOrExpr) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		m.Expr = n.Value
		return nil
	case yaml.MappingNode:
		m.Map = map[string]string{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if v.Kind != yaml.ScalarNode {
				return typeErr("line %d: %s: want a level (read, write or admin)", v.Line, k.Value)
			}
			m.Map[k.Value] = v.Value
		}
		return nil
	}
	return typeErr("line %d: want a mapping of permission: level, or a CEL expression (a string)", n.Line)
}

// maxTokenTimeout bounds oauth2/github_app timeout: a request waits for it.
const maxTokenTimeout = time.Minute

// validateSecretRef checks a client_secret or private_key setting.
func (c *Config) validateSecretRef(key string, r *SecretRef, add func(msg string, path ...any)) {
	switch {
	case r.Ref != "" && r.Credential != "":
		add(key+": give a reference or {credential: NAME}, not both", key)
	case r.Ref != "":
		if r.Field != "" {
			add(key+": field applies only to {credential: NAME}", key)
		}
		if err := inject.ValidateRef(r.Ref); err != nil {
			add(key+": "+refHint(err), key)
		}
	case r.Credential != "":
		other, ok := c.Credentials[r.Credential]
		switch {
		case !ok:
			add(fmt.Sprintf("%s: credential %q is not defined under credentials", key, r.Credential), key, "credential")
		case other.Source != "vault_kv" && other.Source != "static":
			add(fmt.Sprintf("%s: credential %q is %s; a secret the broker holds comes from a vault_kv or static credential", key, r.Credential, other.Source), key, "credential")
		case other.Source == "vault_kv":
			if p, err := inject.ParseVaultPath(other.Path); err == nil && !p.Static() {
				add(fmt.Sprintf("%s: credential %q has a path template; the broker's own secret must have a fixed path", key, r.Credential), key, "credential")
			}
		}
	default:
		add(key+": give env:NAME, file:PATH or {credential: NAME}", key)
	}
}

// validateScopeList checks static scopes.
func validateScopeList(scopes []string, add func(msg string, path ...any)) {
	for i, s := range scopes {
		if _, err := inject.CanonicalScopes([]string{s}); err != nil {
			add(fmt.Sprintf("scopes: %q is not a scope (%v)", s, strings.TrimPrefix(err.Error(), "scope 1 ")), "scopes", i)
		}
	}
	if len(scopes) > 64 {
		add("scopes: at most 64", "scopes")
	}
}

func (c *Config) validateOAuth2(cr Credential, add func(msg string, path ...any)) {
	if cr.TokenURL == "" {
		add("oauth2 needs token_url (the token endpoint)", "token_url")
	} else if err := inject.CheckServiceURL(cr.TokenURL, "a token endpoint URL (absolute, without credentials, query or fragment)", "on loopback"); err != nil {
		add("token_url "+err.Error(), "token_url")
	}
	if cr.ClientID == "" {
		add("oauth2 needs client_id", "client_id")
	} else if inject.CheckValue(cr.ClientID) != nil {
		add("client_id must not contain control characters", "client_id")
	}
	method := cr.AuthMethod
	if method == "" {
		method = inject.AuthClientSecretBasic
	}
	switch method {
	case inject.AuthClientSecretBasic, inject.AuthClientSecretPost:
		if cr.ClientSecret == nil {
			add(method+" needs client_secret (env:NAME, file:PATH or {credential: NAME})", "client_secret")
		} else {
			c.validateSecretRef("client_secret", cr.ClientSecret, add)
		}
		if cr.PrivateKey != nil {
			add("private_key applies only to auth_method: private_key_jwt", "private_key")
		}
	case inject.AuthPrivateKeyJWT:
		if cr.PrivateKey == nil {
			add("private_key_jwt needs private_key (a PEM key: env:NAME, file:PATH or {credential: NAME})", "private_key")
		} else {
			c.validateSecretRef("private_key", cr.PrivateKey, add)
		}
		if cr.ClientSecret != nil {
			add("client_secret is not sent with private_key_jwt; remove it", "client_secret")
		}
	default:
		add(fmt.Sprintf("auth_method %q is not client_secret_basic, client_secret_post or private_key_jwt", cr.AuthMethod), "auth_method")
	}
	if len(cr.Scopes) > 0 && cr.ScopesExpr != "" {
		add("give scopes or scopes_expr, not both", "scopes_expr")
	}
	validateScopeList(cr.Scopes, add)
	if cr.ScopesExpr != "" {
		if _, err := rules.CompileValue(cr.ScopesExpr, rules.ValueStringList, rules.Options{}); err != nil {
			add("scopes_expr: "+err.Error(), "scopes_expr")
		}
	}
	if cr.Audience != "" && inject.CheckValue(cr.Audience) != nil {
		add("audience must not contain control characters", "audience")
	}
	if cr.Resource != "" {
		if u, err := url.Parse(cr.Resource); err != nil || !u.IsAbs() || u.Fragment != "" {
			add(fmt.Sprintf("resource %q must be an absolute URI without a fragment (RFC 8707)", cr.Resource), "resource")
		}
	}
	if time.Duration(cr.Timeout) > maxTokenTimeout {
		add(fmt.Sprintf("timeout must be at most %s", maxTokenTimeout), "timeout")
	}
}

func (c *Config) validateGitHubApp(cr Credential, add func(msg string, path ...any)) {
	if err := inject.CheckGitHubAppID(cr.AppID); err != nil {
		add("app_id "+err.Error(), "app_id")
	}
	if cr.PrivateKey == nil {
		add("github_app needs private_key (the app's PEM key: file:PATH, env:NAME or {credential: NAME})", "private_key")
	} else {
		c.validateSecretRef("private_key", cr.PrivateKey, add)
	}
	if cr.APIURL != "" {
		if err := inject.CheckServiceURL(cr.APIURL, "an API URL", "on loopback"); err != nil {
			add("api_url "+err.Error(), "api_url")
		}
	}
	if cr.InstallationID < 0 {
		add("installation_id must be positive", "installation_id")
	}
	if r := cr.Repositories; r != nil {
		switch {
		case r.Expr != "":
			if _, err := rules.CompileValue(r.Expr, rules.ValueStringList, rules.Options{}); err != nil {
				add("repositories: "+err.Error(), "repositories")
			}
		case len(r.List) == 0:
			add("repositories: the list is empty", "repositories")
		default:
			if _, err := inject.CanonicalRepositories(r.List); err != nil {
				add("repositories: "+err.Error(), "repositories")
			}
		}
	} else if cr.InstallationID == 0 {
		add("github_app needs repositories (owner/repo names, or an expression such as [workload.claims.repository]) or installation_id", "app_id")
	}
	if p := cr.Permissions; p != nil {
		if p.Expr != "" {
			if _, err := rules.CompileValue(p.Expr, rules.ValueJSON, rules.Options{}); err != nil {
				add("permissions: "+err.Error(), "permissions")
			}
		} else {
			for _, k := range slices.Sorted(maps.Keys(p.Map)) {
				if _, err := inject.CanonicalPermissions(map[string]string{k: "read"}); err != nil {
					add(fmt.Sprintf("permissions: %q is not a permission name (a-z, 0-9 and _, e.g. contents, pull_requests)", k), "permissions", k)
				} else if _, err := inject.CanonicalPermissions(map[string]string{k: p.Map[k]}); err != nil {
					add(fmt.Sprintf("permissions: %s: the level must be read, write or admin", k), "permissions", k)
				}
			}
			if len(p.Map) > 50 {
				add("permissions: at most 50", "permissions")
			}
		}
	}
	if time.Duration(cr.Timeout) > maxTokenTimeout {
		add(fmt.Sprintf("timeout must be at most %s", maxTokenTimeout), "timeout")
	}
}

// tokenSourceFits reports why an injector cannot write an oauth2 or
// github_app credential ("" when it can).
func tokenSourceFits(kind, name string, cr Credential) string {
	if cr.Source == "oauth2" && kind == "basic" {
		return fmt.Sprintf("as: basic needs a username and password, but credential %q (oauth2) is a bearer token (use as: bearer)", name)
	}
	return ""
}

// brokerSelf is the identity under which the broker reads its own secrets
// (a client secret or key held in Vault): never a workload's.
var brokerSelf = broker.Identity{ID: "keygate-broker", Method: "broker"}

// secretFunc builds the SecretFunc of a client_secret or private_key: a
// reference is resolved now (a missing variable or file is a problem at
// load, like a static credential's), a credential is read per call
// through its own source and cache.
func (c *Config) secretFunc(r *SecretRef, built map[string]broker.Source) (inject.SecretFunc, error) {
	if r.Ref != "" {
		s, err := inject.ResolveRef(c.resolveRef(r.Ref))
		if err != nil {
			return nil, err
		}
		return inject.StaticSecret(s), nil
	}
	src, ok := built[r.Credential]
	if !ok || src == nil {
		return nil, fmt.Errorf("credential %q could not be built", r.Credential)
	}
	field := r.Field
	if field == "" {
		field = broker.FieldToken
	}
	name := r.Credential
	return func(ctx context.Context) (broker.Secret, error) {
		cred, err := src.Credential(ctx, brokerSelf, broker.Grant{Rule: "(broker)", Credential: name})
		if err != nil {
			return broker.Secret{}, err
		}
		if cred.Release != nil {
			defer cred.Release(context.WithoutCancel(ctx))
		}
		v, ok := cred.Field(field)
		if !ok {
			return broker.Secret{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
				Message: fmt.Sprintf("credential %q has no field %q", name, field)}
		}
		return v, nil
	}, nil
}

// buildTokenSources builds the oauth2 and github_app credentials, after the
// others (their secrets may come from them), each inside its cache and,
// when it has per-request expressions, inside WithParams.
func (c *Config) buildTokenSources(env sourceEnv, built map[string]broker.Source) Problems {
	var ps Problems
	for _, name := range slices.Sorted(maps.Keys(c.Credentials)) {
		cr := c.Credentials[name]
		if cr.Source != "oauth2" && cr.Source != "github_app" {
			continue
		}
		var src broker.Source
		var err error
		var path []any
		if cr.Source == "oauth2" {
			src, path, err = c.buildOAuth2(env, name, cr, built)
		} else {
			src, path, err = c.buildGitHubApp(env, name, cr, built)
		}
		if err != nil {
			ps = append(ps, c.problem(fmt.Sprintf("credential %q: %v", name, strings.TrimPrefix(err.Error(), "inject: ")),
				append([]any{"credentials", name}, path...)...))
			continue
		}
		built[name] = src
	}
	return ps
}

func (c *Config) buildOAuth2(env sourceEnv, name string, cr Credential, built map[string]broker.Source) (broker.Source, []any, error) {
	o := inject.OAuth2Options{
		TokenURL:   cr.TokenURL,
		ClientID:   cr.ClientID,
		AuthMethod: cr.AuthMethod,
		Scopes:     cr.Scopes,
		Audience:   cr.Audience,
		Resource:   cr.Resource,
		HTTPClient: ownClient(env.roots),
		Timeout:    time.Duration(cr.Timeout),
		Clock:      env.clock,
	}
	var err error
	if cr.ClientSecret != nil {
		if o.ClientSecret, err = c.secretFunc(cr.ClientSecret, built); err != nil {
			return nil, []any{"client_secret"}, fmt.Errorf("client_secret: %s", strings.TrimPrefix(err.Error(), "inject: "))
		}
	}
	if cr.PrivateKey != nil {
		if o.PrivateKey, err = c.privateKey(cr.PrivateKey, built); err != nil {
			return nil, []any{"private_key"}, fmt.Errorf("private_key: %s", strings.TrimPrefix(err.Error(), "inject: "))
		}
	}
	src, err := inject.NewOAuth2(name, o)
	if err != nil {
		return nil, nil, err
	}
	ttl, _ := parseCache(cr.Cache)
	src = inject.NewCache(name, src, inject.CacheOptions{TTL: ttl, Clock: env.clock, Metrics: env.metrics})
	if cr.ScopesExpr != "" {
		v, err := rules.CompileValue(cr.ScopesExpr, rules.ValueStringList, rules.Options{Clock: env.clock})
		if err != nil {
			return nil, []any{"scopes_expr"}, fmt.Errorf("scopes_expr: %w", err)
		}
		// Outside the cache: the scopes are part of its key.
		src = inject.WithParams(src, func(ctx context.Context, id broker.Identity, t broker.Target) (map[string]string, error) {
			js, err := v.Eval(ctx, id, t)
			if err != nil {
				return nil, fmt.Errorf("scopes_expr: %w", err)
			}
			p, err := inject.ScopesParam(js)
			if err != nil {
				return nil, fmt.Errorf("scopes_expr: %w", err)
			}
			return map[string]string{inject.ParamOAuth2Scopes: p}, nil
		})
	}
	return src, nil, nil
}

// privateKey is secretFunc for a PEM key; a key given by reference is
// also parsed now, so a bad key is a problem at load.
func (c *Config) privateKey(r *SecretRef, built map[string]broker.Source) (inject.SecretFunc, error) {
	f, err := c.secretFunc(r, built)
	if err != nil {
		return nil, err
	}
	if r.Ref != "" {
		s, _ := f(context.Background())
		if _, _, err := inject.ParsePrivateKeyPEM([]byte(s.Reveal())); err != nil {
			return nil, err
		}
	}
	return f, nil
}

func (c *Config) buildGitHubApp(env sourceEnv, name string, cr Credential, built map[string]broker.Source) (broker.Source, []any, error) {
	o := inject.GitHubAppOptions{
		AppID:          cr.AppID,
		APIURL:         cr.APIURL,
		InstallationID: cr.InstallationID,
		HTTPClient:     ownClient(env.roots),
		Timeout:        time.Duration(cr.Timeout),
		Clock:          env.clock,
	}
	var err error
	if cr.PrivateKey != nil {
		if o.PrivateKey, err = c.privateKey(cr.PrivateKey, built); err != nil {
			return nil, []any{"private_key"}, fmt.Errorf("private_key: %s", strings.TrimPrefix(err.Error(), "inject: "))
		}
	}
	if r := cr.Repositories; r != nil && r.Expr == "" {
		o.Repositories = r.List
	}
	if p := cr.Permissions; p != nil && p.Expr == "" {
		o.Permissions = p.Map
	}
	src, err := inject.NewGitHubApp(name, o)
	if err != nil {
		return nil, nil, err
	}
	ttl, _ := parseCache(cr.Cache)
	src = inject.NewCache(name, src, inject.CacheOptions{TTL: ttl, Clock: env.clock, Metrics: env.metrics})
	opts := rules.Options{Clock: env.clock}
	var repos, perms *rules.Value
	if r := cr.Repositories; r != nil && r.Expr != "" {
		if repos, err = rules.CompileValue(r.Expr, rules.ValueStringList, opts); err != nil {
			return nil, []any{"repositories"}, fmt.Errorf("repositories: %w", err)
		}
	}
	if p := cr.Permissions; p != nil && p.Expr != "" {
		if perms, err = rules.CompileValue(p.Expr, rules.ValueJSON, opts); err != nil {
			return nil, []any{"permissions"}, fmt.Errorf("permissions: %w", err)
		}
	}
	if repos == nil && perms == nil {
		return src, nil, nil
	}
	// Outside the cache: repositories and permissions are part of its key.
	return inject.WithParams(src, func(ctx context.Context, id broker.Identity, t broker.Target) (map[string]string, error) {
		out := make(map[string]string, 2)
		if repos != nil {
			js, err := repos.Eval(ctx, id, t)
			if err != nil {
				return nil, fmt.Errorf("repositories: %w", err)
			}
			if out[inject.ParamGitHubRepositories], err = inject.RepositoriesParam(js); err != nil {
				return nil, fmt.Errorf("repositories: %w", err)
			}
		}
		if perms != nil {
			js, err := perms.Eval(ctx, id, t)
			if err != nil {
				return nil, fmt.Errorf("permissions: %w", err)
			}
			if out[inject.ParamGitHubPermissions], err = inject.PermissionsParam(js); err != nil {
				return nil, fmt.Errorf("permissions: %w", err)
			}
		}
		return out, nil
	}), nil, nil
}
