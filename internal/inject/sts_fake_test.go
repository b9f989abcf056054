package inject

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

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

// TestSTSExpiryCappedByRequestedDuration: an STS whose clock runs ahead of
// the broker's states a later Expiration than the session really has from
// the broker's point of view; the broker never believes more than the
// duration it asked for, counted from before the call. The STS is an
// httptest fake because MinIO's clock is this machine's.
func TestSTSExpiryCappedByRequestedDuration(t *testing.T) {
	ahead := time.Now().Add(2 * time.Hour).UTC().Format(time.RFC3339)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/xml")
		io.WriteString(w, `<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>`+
			`<Credentials><AccessKeyId>ASIAFAKE</AccessKeyId><SecretAccessKey>`+canarytest.New("sts-fake-secret")+`</SecretAccessKey>`+
			`<SessionToken>`+canarytest.New("sts-fake-token")+`</SessionToken><Expiration>`+ahead+`</Expiration></Credentials>`+
			`</AssumeRoleResult><ResponseMetadata><RequestId>x</RequestId></ResponseMetadata></AssumeRoleResponse>`)
	}))
	defer srv.Close()
	src, err := NewSTS(context.Background(), "aws-ci", STSOptions{RoleARN: testRole, Endpoint: srv.URL, Duration: 15 * time.Minute,
		Credentials: credentials.NewStaticCredentialsProvider("AKID", canarytest.New("sts-fake-base"), "")})
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	c, err := src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	if err != nil {
		t.Fatal(err)
	}
	if limit := before.Add(15*time.Minute + time.Second); c.Expires.After(limit) {
		t.Fatalf("session expires %s after the call started, want at most the 15m asked for", c.Expires.Sub(before).Round(time.Second))
	}
	if c.Expires.Before(before.Add(14 * time.Minute)) {
		t.Fatalf("session expires after only %s", c.Expires.Sub(before).Round(time.Second))
	}
}
