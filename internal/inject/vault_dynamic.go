package inject

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// KindVaultDynamic is the Credential.Kind of a vault_dynamic source.
const KindVaultDynamic = "vault_dynamic"

// leasePrefixLen is how much of a lease id's unique suffix the audit shows.
const leasePrefixLen = 8

// VaultDynamicOptions configure NewVaultDynamic.
type VaultDynamicOptions struct {
	// Path is read for every credential and must return a lease:
	// database/creds/ROLE, aws/creds/ROLE, ... (a template, see
	// ParseVaultPath).
	Path string
	// Field and Fields select values as for vault_kv; with neither, every
	// string key of the response (username, password for a database role)
	// becomes a field of the same name.
	Field  string
	Fields map[string]string
}

// VaultDynamic is a source of leased secrets: each call reads Path, which
// makes Vault issue a new secret under a new lease.
//
// The credential's Expires is now + lease_duration and its Release revokes
// the lease (PUT sys/leases/revoke/LEASE, which Vault performs
// synchronously), so with "cache: none" the lease ends when the request
// does. Wrapped in NewCache with ShareLeases and Renew set to d.Renew, a
// lease is shared, renewed while it is used and revoked when it leaves the
// cache (see CacheOptions).
//
// Meta carries "vault_path" (the path read) and "lease": the lease id's
// path and the first 8 characters of its unique suffix, never the full id
// (the full id is enough to renew or revoke the lease).
type VaultDynamic struct {
	v      *Vault
	name   string
	path   *VaultPath
	fields map[string]string

	mu     sync.Mutex
	leases map[string]*vaultLease // by Meta["lease"]
}

type vaultLease struct {
	id        string
	expires   time.Time
	renewable bool
	once      sync.Once
}

// NewVaultDynamic checks the options; it does no network I/O.
func NewVaultDynamic(v *Vault, name string, o VaultDynamicOptions) (*VaultDynamic, error) {
	p, fields, err := vaultSourceOptions(v, name, o.Path, o.Field, o.Fields)
	if err != nil {
		return nil, err
	}
	return &VaultDynamic{v: v, name: name, path: p, fields: fields, leases: map[string]*vaultLease{}}, nil
}

// LeasePrefix shortens a lease id for the audit log: its path and the first
// 8 characters of the unique suffix.
func LeasePrefix(id string) string {
	i := strings.LastIndexByte(id, '/')
	suffix := id[i+1:]
	if len(suffix) > leasePrefixLen {
		suffix = suffix[:leasePrefixLen]
	}
	return id[:i+1] + suffix
}

// Credential reads the path and returns the leased secret.
func (d *VaultDynamic) Credential(ctx context.Context, id broker.Identity, _ broker.Grant) (broker.Credential, error) {
	path, err := d.path.Render(id)
	if err != nil {
		return broker.Credential{}, denyPath(d.name, err)
	}
	sec, err := d.v.read(ctx, path, nil)
	if err != nil {
		return broker.Credential{}, d.v.vaultError(d.name, "reading "+path, err)
	}
	if sec == nil {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: Vault %q has nothing at %s", d.name, d.v.name, path)}
	}
	now := d.v.clock.Now()
	l := &vaultLease{id: sec.LeaseID, renewable: sec.Renewable}
	if sec.LeaseDuration > 0 {
		l.expires = now.Add(time.Duration(sec.LeaseDuration) * time.Second)
	}
	if l.id == "" {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: %s returned no lease (vault_dynamic needs a leased secret; use vault_kv for static ones)", d.name, path)}
	}
	fields, err := secretFields(d.name, path, sec.Data, d.fields)
	if err != nil {
		// Vault issued a secret we cannot use: give it back.
		go func() {
			rctx, cancel := context.WithTimeout(context.Background(), d.v.timeout)
			defer cancel()
			d.revoke(rctx, l)
		}()
		return broker.Credential{}, err
	}
	prefix := LeasePrefix(l.id)
	d.mu.Lock()
	for k, old := range d.leases {
		if !old.expires.IsZero() && !now.Before(old.expires) {
			delete(d.leases, k)
		}
	}
	if _, taken := d.leases[prefix]; !taken {
		d.leases[prefix] = l
	} // else: two live leases share a prefix; this one is revoked but not renewed
	d.mu.Unlock()
	return broker.Credential{
		Name:    d.name,
		Kind:    KindVaultDynamic,
		Fields:  fields,
		Expires: l.expires,
		Meta:    map[string]string{"vault_path": path, "lease": prefix},
		Release: func(ctx context.Context) { d.revoke(ctx, l) },
	}, nil
}

// revoke ends the lease once; failures are logged (the lease then ends at
// its TTL).
func (d *VaultDynamic) revoke(ctx context.Context, l *vaultLease) {
	l.once.Do(func() {
		prefix := LeasePrefix(l.id)
		d.mu.Lock()
		if d.leases[prefix] == l {
			delete(d.leases, prefix)
		}
		d.mu.Unlock()
		if _, err := d.v.write(ctx, "sys/leases/revoke/"+l.id, nil); err != nil {
			d.v.log.Warn("revoking a vault lease failed; it ends at its TTL",
				zap.String("credential", d.name), zap.String("lease", prefix), zap.String("reason", vaultReason(err)))
		}
	})
}

// ErrLeaseUnknown is returned by Renew for a credential whose lease this
// source no longer tracks (revoked, expired, or not one of its own).
var ErrLeaseUnknown = errors.New("lease unknown to this source")

// Renew extends the credential's lease (PUT sys/leases/renew/LEASE) and
// returns its new expiry: now + the lease_duration Vault returns, which
// Vault caps at the role's max_ttl. A lease Vault issued as not renewable
// keeps its expiry.
func (d *VaultDynamic) Renew(ctx context.Context, c broker.Credential) (time.Time, error) {
	d.mu.Lock()
	l := d.leases[c.Meta["lease"]]
	var renewable bool
	var expires time.Time
	if l != nil {
		renewable, expires = l.renewable, l.expires
	}
	d.mu.Unlock()
	if l == nil {
		return time.Time{}, ErrLeaseUnknown
	}
	if !renewable {
		return expires, nil
	}
	sec, err := d.v.write(ctx, "sys/leases/renew/"+l.id, nil)
	if err != nil {
		return time.Time{}, d.v.vaultError(d.name, "renewing lease "+LeasePrefix(l.id), err)
	}
	if sec == nil || sec.LeaseDuration <= 0 {
		return time.Time{}, d.v.vaultError(d.name, "renewing lease "+LeasePrefix(l.id), errVaultGarbage)
	}
	exp := d.v.clock.Now().Add(time.Duration(sec.LeaseDuration) * time.Second)
	d.mu.Lock()
	l.expires = exp
	l.renewable = sec.Renewable
	d.mu.Unlock()
	return exp, nil
}
