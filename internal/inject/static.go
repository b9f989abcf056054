package inject

import (
	"context"
	"maps"

	"github.com/keygate/broker/internal/broker"
)

// KindStatic is the Credential.Kind of a static source.
const KindStatic = "static"

type static struct {
	name   string
	fields map[string]broker.Secret
}

// NewStatic returns a source that always yields the same fields (resolved
// from config references, see ResolveRef). The map is copied here and again
// for every call, so neither the caller of NewStatic nor a consumer of a
// Credential can change what later requests receive. The credential has no
// expiry and no Release.
func NewStatic(name string, fields map[string]broker.Secret) broker.Source {
	return &static{name: name, fields: maps.Clone(fields)}
}

func (s *static) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	f := make(map[string]broker.Secret, len(s.fields))
	maps.Copy(f, s.fields)
	return broker.Credential{Name: s.name, Kind: KindStatic, Fields: f}, nil
}
