package inject

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/keygate/broker/internal/broker"
)

// KindVaultKV is the Credential.Kind of a vault_kv source.
const KindVaultKV = "vault_kv"

// Path templates (vault_kv and vault_dynamic).
//
// A path may contain {{VARIABLE}} placeholders filled from the caller's
// identity at request time:
//
//	{{workload.id}}  {{workload.trust_domain}}  {{workload.method}}
//	{{workload.claims.NAME}}  {{delegator.sub}}  {{delegator.claims.NAME}}
//
// NAME is a top-level claim, 1-64 of [A-Za-z0-9_-]. A substituted value must
// be 1-256 characters of [A-Za-z0-9._@+=-], must not be "." and must not
// contain "..": it fills at most part of one path segment, never a '/', a
// '\', a '%' escape, a control character or a traversal, so a claim cannot
// walk the path. A value that breaks this rule, a missing value and a claim
// that is not a string or a number deny the request (403) with an error that
// names the variable and never the value. SPIFFE IDs contain '/', so
// {{workload.id}} fits only identities without one (cidr names, token
// subjects); use a claim for SPIFFE workloads.
//
// The literal text of a template may hold [A-Za-z0-9._@+=:,~-] and '/';
// segments are never empty, "." or "..", and the first segment (the mount)
// must be literal.
const (
	maxPathValue = 256
	maxClaimName = 64
)

// VaultPath is a parsed path template.
type VaultPath struct {
	raw   string
	parts []pathPart
}

type pathPart struct {
	lit string
	v   string // variable name without braces; "" for a literal
}

// VaultPathError is a template that could not be rendered for a caller. It
// names the variable, never its value.
type VaultPathError struct {
	Var    string
	Reason string
}

func (e *VaultPathError) Error() string {
	return "path template variable {{" + e.Var + "}}: " + e.Reason
}

// ParseVaultPath parses and checks a path template (also a plain path).
func ParseVaultPath(s string) (*VaultPath, error) {
	p := &VaultPath{raw: s}
	rest := s
	var skel strings.Builder
	for rest != "" {
		i := strings.Index(rest, "{{")
		if i < 0 {
			p.parts = append(p.parts, pathPart{lit: rest})
			skel.WriteString(rest)
			break
		}
		if i > 0 {
			p.parts = append(p.parts, pathPart{lit: rest[:i]})
			skel.WriteString(rest[:i])
		}
		j := strings.Index(rest[i:], "}}")
		if j < 0 {
			return nil, fmt.Errorf("path %q: %q is not closed by }}", s, "{{")
		}
		name := strings.TrimSpace(rest[i+2 : i+j])
		if err := checkPathVar(name); err != nil {
			return nil, fmt.Errorf("path %q: %w", s, err)
		}
		p.parts = append(p.parts, pathPart{v: name})
		skel.WriteString("\x00") // stands for one value: never '/', never empty
		rest = rest[i+j+2:]
	}
	for _, pt := range p.parts {
		if pt.v != "" {
			continue
		}
		if strings.Contains(pt.lit, "}}") {
			return nil, fmt.Errorf("path %q: %q without an opening {{", s, "}}")
		}
		for k := 0; k < len(pt.lit); k++ {
			if !pathLiteralByte(pt.lit[k]) {
				return nil, fmt.Errorf("path %q: character %q is not allowed in a Vault path here", s, pt.lit[k])
			}
		}
	}
	segs := strings.Split(skel.String(), "/")
	if skel.Len() == 0 {
		return nil, errors.New("path is empty")
	}
	for n, seg := range segs {
		switch {
		case seg == "":
			return nil, fmt.Errorf("path %q has an empty segment (leading, trailing or doubled '/')", s)
		case seg == "." || seg == "..":
			return nil, fmt.Errorf("path %q has a %q segment", s, seg)
		case n == 0 && strings.Contains(seg, "\x00"):
			return nil, fmt.Errorf("path %q: the first segment (the mount) must not hold a template variable", s)
		}
	}
	return p, nil
}

func checkPathVar(name string) error {
	switch name {
	case "workload.id", "workload.trust_domain", "workload.method", "delegator.sub":
		return nil
	}
	for _, pre := range []string{"workload.claims.", "delegator.claims."} {
		if claim, ok := strings.CutPrefix(name, pre); ok {
			if claim == "" || len(claim) > maxClaimName || strings.Trim(claim, claimNameChars) != "" {
				return fmt.Errorf("{{%s}}: a claim name is 1-%d of A-Z a-z 0-9 _ -", name, maxClaimName)
			}
			return nil
		}
	}
	return fmt.Errorf("{{%s}} is not a path variable (workload.id, workload.trust_domain, workload.method, workload.claims.NAME, delegator.sub, delegator.claims.NAME)", name)
}

const claimNameChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"

func pathLiteralByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("._@+=:,~-/", c) >= 0
}

// PathValueAllowed reports whether s may be substituted into a path.
func PathValueAllowed(s string) bool {
	if s == "" || len(s) > maxPathValue || s == "." || strings.Contains(s, "..") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("._@+=-", c) >= 0) {
			return false
		}
	}
	return true
}

// String is the template as written.
func (p *VaultPath) String() string { return p.raw }

// Static reports whether the path has no variable.
func (p *VaultPath) Static() bool {
	return len(p.parts) <= 1 && (len(p.parts) == 0 || p.parts[0].v == "")
}

// Render fills the template for a caller; the error is a *VaultPathError.
func (p *VaultPath) Render(id broker.Identity) (string, error) {
	if p.Static() {
		return p.raw, nil
	}
	var b strings.Builder
	for _, pt := range p.parts {
		if pt.v == "" {
			b.WriteString(pt.lit)
			continue
		}
		val, err := pathValue(id, pt.v)
		if err != nil {
			return "", &VaultPathError{Var: pt.v, Reason: err.Error()}
		}
		if !PathValueAllowed(val) {
			return "", &VaultPathError{Var: pt.v, Reason: "its value is not usable in a Vault path " +
				"(allowed: 1-256 of A-Z a-z 0-9 . _ - @ + =, not \".\" and without \"..\")"}
		}
		b.WriteString(val)
	}
	return b.String(), nil
}

func pathValue(id broker.Identity, name string) (string, error) {
	var v any
	var ok bool
	switch name {
	case "workload.id":
		v, ok = id.ID, id.ID != ""
	case "workload.trust_domain":
		v, ok = id.TrustDomain, id.TrustDomain != ""
	case "workload.method":
		v, ok = id.Method, id.Method != ""
	case "delegator.sub":
		v, ok = id.Delegator.Sub, id.Delegator.Sub != ""
	default:
		if c, isW := strings.CutPrefix(name, "workload.claims."); isW {
			v, ok = id.Claims[c]
		} else if c, isD := strings.CutPrefix(name, "delegator.claims."); isD {
			v, ok = id.Delegator.Claims[c]
		}
	}
	if !ok || v == nil {
		return "", errors.New("not set for this caller")
	}
	switch x := v.(type) {
	case string:
		return x, nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case int:
		return strconv.Itoa(x), nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case json.Number:
		return x.String(), nil
	}
	return "", errors.New("not a string or a number")
}

// VaultKVOptions configure NewVaultKV.
type VaultKVOptions struct {
	// Path is the secret's API path, e.g. secret/data/ci/github (KV v2) or
	// kv1/ci/github (KV v1), possibly a template. When the KV version is
	// detected and is 2, "data/" is inserted after the mount if the path
	// lacks it (secret/ci/github reads secret/data/ci/github).
	Path string
	// Field selects one Vault key as the credential's "token" field.
	Field string
	// Fields maps credential fields to Vault keys (username: user,
	// password: pass); all are taken from one read. With neither Field nor
	// Fields, every string, number or boolean key of the secret becomes a
	// field of the same name.
	Fields map[string]string
	// Version pins a KV v2 version (0: the latest).
	Version int
	// KVVersion is 1 or 2; 0 detects it from sys/internal/ui/mounts (one
	// call per mount, remembered by the connection). When set, Path is used
	// exactly as written.
	KVVersion int
}

type vaultKV struct {
	v      *Vault
	name   string
	path   *VaultPath
	fields map[string]string
	o      VaultKVOptions
}

// NewVaultKV returns a source that reads a KV secret for each call (no
// caching of its own; wrap it with NewCache). It does no network I/O here.
func NewVaultKV(v *Vault, name string, o VaultKVOptions) (broker.Source, error) {
	p, fields, err := vaultSourceOptions(v, name, o.Path, o.Field, o.Fields)
	if err != nil {
		return nil, err
	}
	switch {
	case o.KVVersion != 0 && o.KVVersion != 1 && o.KVVersion != 2:
		return nil, fmt.Errorf("inject: credential %q: kv_version %d is not 1 or 2", name, o.KVVersion)
	case o.Version < 0:
		return nil, fmt.Errorf("inject: credential %q: version %d is negative", name, o.Version)
	case o.Version > 0 && o.KVVersion == 1:
		return nil, fmt.Errorf("inject: credential %q: version pins need KV v2", name)
	}
	return &vaultKV{v: v, name: name, path: p, fields: fields, o: o}, nil
}

// fieldMap merges field (the token) and fields; nil means "every key".
func fieldMap(field string, fields map[string]string) (map[string]string, error) {
	if field == "" && len(fields) == 0 {
		return nil, nil
	}
	m := maps.Clone(fields)
	if m == nil {
		m = map[string]string{}
	}
	if field != "" {
		if _, dup := m[broker.FieldToken]; dup {
			return nil, errors.New("field and fields.token both set the token")
		}
		m[broker.FieldToken] = field
	}
	for k, key := range m {
		if k == "" || key == "" {
			return nil, errors.New("fields: empty credential field or Vault key")
		}
	}
	return m, nil
}

func (s *vaultKV) Credential(ctx context.Context, id broker.Identity, _ broker.Grant) (broker.Credential, error) {
	path, err := s.path.Render(id)
	if err != nil {
		return broker.Credential{}, denyPath(s.name, err)
	}
	version := s.o.KVVersion
	if version == 0 {
		m, err := s.v.kvMount(ctx, path)
		if err != nil {
			return broker.Credential{}, s.v.vaultError(s.name, "detecting the KV version of "+path, err)
		}
		if m.err != "" {
			return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
				Message: fmt.Sprintf("credential %q: %s %s", s.name, path, m.err)}
		}
		version = m.version
		if rel, _ := strings.CutPrefix(path, m.path); version == 2 && !strings.HasPrefix(rel, "data/") {
			path = m.path + "data/" + rel
		}
	}
	if s.o.Version > 0 && version != 2 {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: a version pin needs KV v2 and %s is KV v1", s.name, path)}
	}
	var q map[string][]string
	if s.o.Version > 0 {
		q = map[string][]string{"version": {strconv.Itoa(s.o.Version)}}
	}
	sec, err := s.v.read(ctx, path, q)
	if err != nil {
		return broker.Credential{}, s.v.vaultError(s.name, "reading "+path, err)
	}
	meta := map[string]string{"vault_path": path, "kv_version": strconv.Itoa(version)}
	var data map[string]any
	if sec != nil {
		data = sec.Data
		if version == 2 {
			data = nil
			if d, ok := sec.Data["data"].(map[string]any); ok {
				data = d
			}
			if md, ok := sec.Data["metadata"].(map[string]any); ok {
				if n, ok := md["version"].(json.Number); ok {
					meta["vault_version"] = n.String()
				}
			}
		}
	}
	if sec == nil || data == nil {
		what := "no secret"
		if s.o.Version > 0 {
			what = fmt.Sprintf("no live version %d of the secret", s.o.Version)
		}
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: Vault %q has %s at %s", s.name, s.v.name, what, path)}
	}
	fields, err := secretFields(s.name, path, data, s.fields)
	if err != nil {
		return broker.Credential{}, err
	}
	return broker.Credential{Name: s.name, Kind: KindVaultKV, Fields: fields, Meta: meta}, nil
}

func denyPath(cred string, err error) error {
	return &broker.Error{Code: broker.CodeDenied,
		Message: fmt.Sprintf("credential %q: %v", cred, err), Err: err}
}

// secretFields picks the credential's fields out of one Vault response.
// Errors name the credential field, the Vault key and the path, never a
// value.
func secretFields(cred, path string, data map[string]any, want map[string]string) (map[string]broker.Secret, error) {
	out := make(map[string]broker.Secret, max(len(want), len(data)))
	if want == nil {
		for _, k := range slices.Sorted(maps.Keys(data)) {
			if s, ok := scalarString(data[k]); ok && s != "" {
				out[k] = broker.NewSecret(s)
			}
		}
		if len(out) == 0 {
			return nil, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: the secret at %s holds no string values", cred, path)}
		}
		return out, nil
	}
	for _, f := range slices.Sorted(maps.Keys(want)) {
		key := want[f]
		raw, ok := data[key]
		if !ok {
			// Vault answered, and the answer lacks the value: a bad answer
			// (502), like an empty or non-string value (SECURITY-TESTS F-03).
			return nil, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: field %q: the secret at %s has no key %q", cred, f, path, key)}
		}
		s, ok := scalarString(raw)
		if !ok {
			return nil, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: field %q: key %q at %s is not a string", cred, f, key, path)}
		}
		if s == "" {
			return nil, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: field %q: key %q at %s is empty", cred, f, key, path)}
		}
		out[f] = broker.NewSecret(s)
	}
	return out, nil
}

func scalarString(v any) (string, bool) {
	switch x := v.(type) {
	case string:
		return x, true
	case json.Number:
		return x.String(), true
	case bool:
		return strconv.FormatBool(x), true
	}
	return "", false
}

// kvMountInfo is what sys/internal/ui/mounts says about a path.
type kvMountInfo struct {
	path    string // with trailing '/'
	version int
	err     string // not a KV mount: the reason
}

// kvMount finds the mount holding path, asking Vault once per mount.
func (v *Vault) kvMount(ctx context.Context, path string) (kvMountInfo, error) {
	v.mu.Lock()
	for _, m := range v.mounts {
		if strings.HasPrefix(path, m.path) {
			v.mu.Unlock()
			return m, nil
		}
	}
	v.mu.Unlock()
	ch := v.sf.DoChan("mount:"+path, func() (any, error) {
		mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*v.timeout)
		defer cancel()
		sec, err := v.read(mctx, "sys/internal/ui/mounts/"+path, nil)
		if err != nil {
			return nil, err
		}
		if sec == nil || sec.Data == nil {
			return nil, &api.ResponseError{StatusCode: 404}
		}
		m := kvMountInfo{}
		m.path, _ = sec.Data["path"].(string)
		typ, _ := sec.Data["type"].(string)
		if m.path == "" || !strings.HasPrefix(path, m.path) {
			return nil, fmt.Errorf("%w: the mount lookup did not describe the path", errVaultGarbage)
		}
		opts, _ := sec.Data["options"].(map[string]any)
		ver, _ := opts["version"].(string)
		switch {
		case typ == "kv" && ver == "2":
			m.version = 2
		case typ == "kv" || typ == "generic":
			m.version = 1
		default:
			m.err = fmt.Sprintf("is not on a KV mount (mount %s has type %q)", m.path, typ)
		}
		v.mu.Lock()
		v.mounts = append(v.mounts, m)
		v.mu.Unlock()
		return m, nil
	})
	select {
	case <-ctx.Done():
		return kvMountInfo{}, ctx.Err()
	case r := <-ch:
		if r.Err != nil {
			return kvMountInfo{}, r.Err
		}
		return r.Val.(kvMountInfo), nil
	}
}

var errVaultGarbage = errors.New("vault sent an unexpected response")

// vaultSourceOptions checks what every Vault source needs: a connection, a
// path template and the field selection.
func vaultSourceOptions(v *Vault, name, path, field string, fields map[string]string) (*VaultPath, map[string]string, error) {
	if v == nil {
		return nil, nil, fmt.Errorf("inject: credential %q: no vault connection", name)
	}
	p, err := ParseVaultPath(path)
	if err != nil {
		return nil, nil, fmt.Errorf("inject: credential %q: %w", name, err)
	}
	fm, err := fieldMap(field, fields)
	if err != nil {
		return nil, nil, fmt.Errorf("inject: credential %q: %w", name, err)
	}
	return p, fm, nil
}
