package config

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
)

// DefaultKubernetesTokenFile is where Kubernetes projects a pod's
// service-account token; the kubernetes auth method reads it when
// token_file is not set.
const DefaultKubernetesTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// maxVaultTimeout bounds vaults.*.timeout: a request waits for it.
const maxVaultTimeout = 5 * time.Minute

// vaultAuthKeys are the auth keys each method takes (besides method and
// mount).
var vaultAuthKeys = map[string][]string{
	inject.VaultAuthJWT:        {"role", "token_file", "jwt_svid"},
	inject.VaultAuthKubernetes: {"role", "token_file"},
	inject.VaultAuthAppRole:    {"role_id_file", "secret_id_file"},
	inject.VaultAuthTokenFile:  {"token_file", "child_token_ttl"},
}

func (c *Config) validateVaults() Problems {
	var ps Problems
	for _, name := range slices.Sorted(maps.Keys(c.Vaults)) {
		v := c.Vaults[name]
		add := func(msg string, path ...any) {
			ps = append(ps, c.problem(fmt.Sprintf("vault %q: %s", name, msg), append([]any{"vaults", name}, path...)...))
		}
		if name == "" {
			add("a vault needs a name")
		}
		switch {
		case v.Address == "" && !v.UseEnv:
			add("address is required (for example https://vault.example:8200)")
		case v.Address != "":
			if err := inject.CheckVaultAddress(v.Address); err != nil {
				add(err.Error(), "address")
			}
		}
		if d := time.Duration(v.Timeout); d > maxVaultTimeout {
			add(fmt.Sprintf("timeout must be at most %s", maxVaultTimeout), "timeout")
		}
		if v.Namespace != "" && (strings.Contains(v.Namespace, "..") || strings.ContainsAny(v.Namespace, "?#% \\")) {
			add(fmt.Sprintf("namespace %q is not a Vault namespace path", v.Namespace), "namespace")
		}
		a := v.Auth
		allowed, known := vaultAuthKeys[a.Method]
		switch {
		case a.Method == "":
			add("auth.method is required (jwt, kubernetes, approle or token_file)", "auth")
			continue
		case !known:
			add(fmt.Sprintf("auth.method %q is not one of jwt, kubernetes, approle, token_file", a.Method), "auth", "method")
			continue
		}
		set := map[string]bool{"role": a.Role != "", "token_file": a.TokenFile != "", "jwt_svid": a.JWTSVID != nil,
			"role_id_file": a.RoleIDFile != "", "secret_id_file": a.SecretIDFile != "", "child_token_ttl": a.ChildTokenTTL != 0}
		for _, k := range slices.Sorted(maps.Keys(set)) {
			if set[k] && !slices.Contains(allowed, k) {
				add(fmt.Sprintf("auth method %s does not take %s (it takes %s and mount)", a.Method, k, strings.Join(allowed, ", ")), "auth", k)
			}
		}
		if a.Mount != "" && (strings.HasPrefix(a.Mount, "/") || strings.Contains(a.Mount, "..") || strings.ContainsAny(a.Mount, "?#% \\")) {
			add(fmt.Sprintf("auth.mount %q is not a Vault path", a.Mount), "auth", "mount")
		}
		switch a.Method {
		case inject.VaultAuthJWT:
			if a.Role == "" {
				add("auth jwt needs a role", "auth")
			}
			switch {
			case (a.TokenFile == "") == (a.JWTSVID == nil):
				add("auth jwt needs exactly one of token_file or jwt_svid (the broker's own JWT)", "auth")
			case a.JWTSVID != nil && a.JWTSVID.Audience == "":
				add("auth.jwt_svid needs an audience (the bound_audiences of the Vault role, e.g. vault)", "auth", "jwt_svid")
			}
		case inject.VaultAuthKubernetes:
			if a.Role == "" {
				add("auth kubernetes needs a role", "auth")
			}
		case inject.VaultAuthAppRole:
			if a.RoleIDFile == "" || a.SecretIDFile == "" {
				add("auth approle needs role_id_file and secret_id_file", "auth")
			}
		case inject.VaultAuthTokenFile:
			if a.TokenFile == "" {
				add("auth token_file needs token_file (a file holding a Vault token)", "auth")
			}
			if a.ChildTokenTTL != 0 && time.Duration(a.ChildTokenTTL) < time.Minute {
				add("auth.child_token_ttl must be at least 1m", "auth", "child_token_ttl")
			}
		}
	}
	return ps
}

// validateVaultSource checks a vault_kv or vault_dynamic credential.
func (c *Config) validateVaultSource(cr Credential, add func(msg string, path ...any)) {
	switch _, ok := c.Vaults[cr.Vault]; {
	case cr.Vault == "":
		add(cr.Source + " needs vault (a name under vaults)")
	case !ok:
		add(fmt.Sprintf("vault %q is not defined under vaults", cr.Vault), "vault")
	}
	if cr.Path == "" {
		add(cr.Source+" needs path", "path")
	} else if _, err := inject.ParseVaultPath(cr.Path); err != nil {
		add(err.Error(), "path")
	}
	if cr.Field != "" && cr.Fields[broker.FieldToken] != "" {
		add("field and fields.token both set the token field", "field")
	}
	for _, k := range slices.Sorted(maps.Keys(cr.Fields)) {
		if k == "" || cr.Fields[k] == "" {
			add("fields: a credential field and its Vault key must not be empty", "fields")
		}
	}
	if cr.Source == "vault_kv" {
		switch {
		case cr.KVVersion != 0 && cr.KVVersion != 1 && cr.KVVersion != 2:
			add(fmt.Sprintf("kv_version %d is not 1 or 2", cr.KVVersion), "kv_version")
		case cr.Version < 0:
			add("version must not be negative", "version")
		case cr.Version > 0 && cr.KVVersion == 1:
			add("version pins a KV v2 version; kv_version is 1", "version")
		}
	}
}

// buildVaults makes one connection per vaults: entry, offline. A vault
// that cannot be built is reported and mapped to nil, so credentials
// naming it are not reported twice.
func (c *Config) buildVaults(env sourceEnv, log *zap.Logger) (map[string]*inject.Vault, Problems) {
	var ps Problems
	out := make(map[string]*inject.Vault, len(c.Vaults))
	for _, name := range slices.Sorted(maps.Keys(c.Vaults)) {
		v := c.Vaults[name]
		a := v.Auth
		auth := inject.VaultAuth{Method: a.Method, Mount: a.Mount, Role: a.Role,
			RoleIDFile: c.resolvePath(a.RoleIDFile), SecretIDFile: c.resolvePath(a.SecretIDFile)}
		switch a.Method {
		case inject.VaultAuthJWT, inject.VaultAuthKubernetes:
			switch {
			case a.JWTSVID != nil:
				sock := a.JWTSVID.Socket
				if sock == "" {
					sock = env.spiffe
				}
				auth.Token = inject.JWTSVIDToken{Addr: sock, Audience: a.JWTSVID.Audience}
			case a.TokenFile != "":
				auth.Token = inject.FileToken(c.resolvePath(a.TokenFile))
			default:
				auth.Token = inject.FileToken(DefaultKubernetesTokenFile)
			}
		case inject.VaultAuthTokenFile:
			auth.TokenFile = c.resolvePath(a.TokenFile)
			auth.ChildTTL = time.Duration(a.ChildTokenTTL)
		}
		o := inject.VaultOptions{
			Name:      name,
			Address:   v.Address,
			CABundle:  c.resolvePath(v.CABundle),
			Namespace: v.Namespace,
			Timeout:   time.Duration(v.Timeout),
			UseEnv:    v.UseEnv,
			Auth:      auth,
			Logger:    log,
			Clock:     env.clock,
		}
		if v.CABundle == "" {
			o.CAPool = env.roots // egress.ca_bundle plus the system roots; nil: the system roots
		}
		conn, err := inject.NewVault(o)
		if err != nil {
			ps = append(ps, c.problem(strings.TrimPrefix(err.Error(), "inject: "), "vaults", name))
			out[name] = nil
			continue
		}
		out[name] = conn
	}
	return out, ps
}

// buildVaultSource builds a vault_kv or vault_dynamic credential on its
// connection, inside the cache. A dynamic credential's leases are shared
// by the cache, renewed while used and revoked when they leave it.
func (c *Config) buildVaultSource(env sourceEnv, vaults map[string]*inject.Vault, name string, cr Credential) (broker.Source, error) {
	v, ok := vaults[cr.Vault]
	if !ok {
		return nil, fmt.Errorf("vault %q is not running: adding or changing vaults needs a restart", cr.Vault)
	}
	if v == nil {
		return nil, nil // its vault was reported
	}
	ttl, _ := parseCache(cr.Cache)
	o := inject.CacheOptions{TTL: ttl, Clock: env.clock, Metrics: env.metrics}
	if cr.Source == "vault_kv" {
		src, err := inject.NewVaultKV(v, name, inject.VaultKVOptions{Path: cr.Path, Field: cr.Field, Fields: cr.Fields,
			Version: cr.Version, KVVersion: cr.KVVersion})
		if err != nil {
			return nil, err
		}
		return inject.NewCache(name, src, o), nil
	}
	d, err := inject.NewVaultDynamic(v, name, inject.VaultDynamicOptions{Path: cr.Path, Field: cr.Field, Fields: cr.Fields})
	if err != nil {
		return nil, err
	}
	o.ShareLeases, o.Renew = true, d.Renew
	return inject.NewCache(name, d, o), nil
}

// closeAll closes every closer (caches, then vault connections), in
// parallel, within ctx.
func closeAll(ctx context.Context, log *zap.Logger, what string, cs []inject.Closer) {
	done := make(chan struct{}, len(cs))
	for _, cl := range cs {
		go func() {
			if err := cl.Close(ctx); err != nil {
				log.Warn("closing "+what+" did not finish cleanly", zap.Error(err))
			}
			done <- struct{}{}
		}()
	}
	for range cs {
		<-done
	}
}

// sourceClosers are the sources that hold something until closed (cached
// leases).
func sourceClosers(sources map[string]broker.Source) []inject.Closer {
	var out []inject.Closer
	for _, name := range slices.Sorted(maps.Keys(sources)) {
		if cl, ok := sources[name].(inject.Closer); ok {
			out = append(out, cl)
		}
	}
	return out
}
