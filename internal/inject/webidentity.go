package inject

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/keygate/broker/internal/broker"
)

// FileToken reads the broker's own web identity token (a projected
// Kubernetes service-account token, a CI job's OIDC token) from a file on
// every call, so a rotated token is always current. Errors name the path,
// never the contents.
type FileToken string

// Token implements TokenSource.
func (f FileToken) Token(context.Context) (broker.Secret, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return broker.Secret{}, fmt.Errorf("reading the token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return broker.Secret{}, fmt.Errorf("token file %q is empty", string(f))
	}
	return broker.NewSecret(tok), nil
}

// JWTSVIDToken fetches the broker's own JWT-SVID for Audience from the
// SPIFFE Workload API at Addr ("" means SPIFFE_ENDPOINT_SOCKET) on every
// call. JWT-SVIDs are short-lived and a call is made only when a credential
// is minted, so nothing is cached here.
type JWTSVIDToken struct {
	Addr     string
	Audience string
}

// Token implements TokenSource.
func (j JWTSVIDToken) Token(ctx context.Context) (broker.Secret, error) {
	if j.Audience == "" {
		return broker.Secret{}, errors.New("jwt_svid: audience is empty")
	}
	var opts []workloadapi.ClientOption
	if j.Addr != "" {
		opts = append(opts, workloadapi.WithAddr(j.Addr))
	}
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: j.Audience}, opts...)
	if err != nil {
		return broker.Secret{}, fmt.Errorf("jwt_svid: fetching from the workload api: %w", err)
	}
	return broker.NewSecret(svid.Marshal()), nil
}
