package inject

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

// TestSTSCertificateErrorNotRetried: an STS endpoint whose certificate does
// not verify gets one TLS handshake, not a retry (the SDK would otherwise
// retry it as a connection error), and nothing is ever sent to it. The
// endpoint is an httptest server because its untrusted certificate is the
// point: MinIO here is trusted.
func TestSTSCertificateErrorNotRetried(t *testing.T) {
	var conns, requests atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		requests.Add(1)
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()

	secret := canarytest.New("sts-tls-base")
	src, err := NewSTS(context.Background(), "aws-ci", STSOptions{RoleARN: testRole, Endpoint: srv.URL,
		Credentials: credentials.NewStaticCredentialsProvider("AKID", secret, "")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	var be *broker.Error
	if !errors.As(err, &be) || be.Code != broker.CodeCredentialUnavailable {
		t.Fatalf("error = %v, want credential_unavailable", err)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections to an STS endpoint with an untrusted certificate, want 1 (no retry)", n)
	}
	if n := requests.Load(); n != 0 {
		t.Errorf("%d requests reached the untrusted endpoint, want 0", n)
	}
	canarytest.ObserveString("sts tls error", err.Error())
}
