package inject

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// The STS tests talk to a real MinIO (its STS AssumeRole and its
// SigV4-verifying S3), started by internal/testservers.

const testRole = "arn:aws:iam::123456789012:role/ci"

// countingTransport counts STS calls reaching the network.
type countingTransport struct {
	rt    http.RoundTripper
	calls atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.calls.Add(1)
	return c.rt.RoundTrip(r)
}

type stsWorld struct {
	m      *testservers.MinIO
	rt     *countingTransport
	client *http.Client
}

func newSTSWorld(t *testing.T) *stsWorld {
	t.Helper()
	m := testservers.StartMinIO(t, testservers.MinIOOptions{})
	rt := &countingTransport{rt: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: m.CAPool}}}
	return &stsWorld{m: m, rt: rt, client: &http.Client{Transport: rt}}
}

func (w *stsWorld) source(t *testing.T, o STSOptions) broker.Source {
	t.Helper()
	if o.RoleARN == "" {
		o.RoleARN = testRole
	}
	o.Endpoint = w.m.Endpoint
	o.HTTPClient = w.client
	if o.Credentials == nil {
		o.Credentials = credentials.NewStaticCredentialsProvider(w.m.RootUser, w.m.RootPassword, "")
	}
	src, err := NewSTS(context.Background(), "aws-ci", o)
	if err != nil {
		t.Fatalf("NewSTS: %v", err)
	}
	return src
}

// s3With is an S3 client that signs itself with the minted credential.
func (w *stsWorld) s3With(c broker.Credential) *s3.Client {
	f := func(n string) string { s, _ := c.Field(n); return s.Reveal() }
	// MinIO-issued: swept for by the suite-wide sweep (canarytest).
	if c.Kind == KindAWSSTS {
		canarytest.Register("minio sts secret key", f(broker.FieldSecretAccessKey))
		canarytest.Register("minio sts session token", f(broker.FieldSessionToken))
	}
	return s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(w.m.Endpoint),
		UsePathStyle: true,
		HTTPClient:   &http.Client{Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: w.m.CAPool}}},
		Credentials: credentials.NewStaticCredentialsProvider(f(broker.FieldAccessKeyID),
			f(broker.FieldSecretAccessKey), f(broker.FieldSessionToken)),
	})
}

var ciIdentity = broker.Identity{ID: "spiffe://example.org/ci/build", Method: "spiffe-x509", TrustDomain: "example.org"}

func TestSTSAssumeRoleMinIO(t *testing.T) {
	w := newSTSWorld(t)
	ctx := context.Background()
	src := w.source(t, STSOptions{SourceIdentity: true})
	start := time.Now()
	c, err := src.Credential(ctx, ciIdentity, broker.Grant{Credential: "aws-ci",
		Params: map[string]string{ParamTagPrefix + "team": "payments", ParamTagPrefix + "repo": "acme/app"}})
	if err != nil {
		t.Fatalf("Credential: %v", err)
	}
	if c.Kind != KindAWSSTS || c.Name != "aws-ci" {
		t.Fatalf("kind/name = %q/%q", c.Kind, c.Name)
	}
	for _, f := range []string{broker.FieldAccessKeyID, broker.FieldSecretAccessKey, broker.FieldSessionToken} {
		if _, ok := c.Field(f); !ok {
			t.Fatalf("field %s missing", f)
		}
	}
	if ttl := c.Expires.Sub(start); ttl < 14*time.Minute || ttl > 16*time.Minute {
		t.Fatalf("expires in %s, want about the 15m duration", ttl)
	}
	if c.Meta["role"] != testRole || c.Meta["session"] != "example.org-ci-build" {
		t.Fatalf("meta = %v", c.Meta)
	}
	// The minted credential is real: MinIO accepts it.
	s3c := w.s3With(c)
	if _, err := s3c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("bucket-a")}); err != nil {
		t.Fatalf("CreateBucket with the minted credential: %v", err)
	}
}

func TestSTSSessionPolicyDownScopes(t *testing.T) {
	w := newSTSWorld(t)
	ctx := context.Background()
	root := broker.Credential{Fields: map[string]broker.Secret{
		broker.FieldAccessKeyID:     broker.NewSecret(w.m.RootUser),
		broker.FieldSecretAccessKey: broker.NewSecret(w.m.RootPassword)}}
	for _, b := range []string{"bucket-a", "bucket-b"} {
		if _, err := w.s3With(root).CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(b)}); err != nil {
			t.Fatal(err)
		}
	}
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:ListBucket"],"Resource":["arn:aws:s3:::bucket-a"]}]}`
	c, err := w.source(t, STSOptions{}).Credential(ctx, ciIdentity, broker.Grant{Credential: "aws-ci",
		Params: map[string]string{ParamSessionPolicy: policy}})
	if err != nil {
		t.Fatalf("Credential: %v", err)
	}
	if c.Meta["policy_sha256"] == "" {
		t.Fatalf("meta has no policy hash: %v", c.Meta)
	}
	s3c := w.s3With(c)
	if _, err := s3c.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String("bucket-a")}); err != nil {
		t.Fatalf("listing bucket-a (allowed by the session policy): %v", err)
	}
	_, err = s3c.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String("bucket-b")})
	if err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Fatalf("listing bucket-b = %v, want AccessDenied from MinIO", err)
	}
}

func TestSTSFailuresAreSummarised(t *testing.T) {
	w := newSTSWorld(t)
	ctx := context.Background()
	tests := []struct {
		name     string
		opts     STSOptions
		params   map[string]string
		stop     bool
		wantCode string // STS error code in the message; "" for a transport failure
	}{
		{name: "wrong base secret", opts: STSOptions{Credentials: credentials.NewStaticCredentialsProvider(
			"keygate-root", "CANARY-wrong-secret-9d2e", "")}, wantCode: "AccessDenied"},
		{name: "malformed policy", params: map[string]string{ParamSessionPolicy: `{"Version":"2012-10-17"`},
			wantCode: "InvalidParameterValue"},
		{name: "sts stopped", stop: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := w.source(t, tc.opts)
			if tc.stop {
				w.m.Stop()
				defer w.m.Start()
			}
			start := time.Now()
			_, err := src.Credential(ctx, ciIdentity, broker.Grant{Credential: "aws-ci", Params: tc.params})
			if err == nil {
				t.Fatal("no error")
			}
			if d := time.Since(start); d > DefaultSTSTimeout+5*time.Second {
				t.Fatalf("failure took %s", d)
			}
			var be *broker.Error
			if !errors.As(err, &be) || be.Code != broker.CodeCredentialUnavailable || be.Status() != http.StatusServiceUnavailable {
				t.Fatalf("error = %#v, want a credential_unavailable *broker.Error", err)
			}
			if tc.wantCode != "" && !strings.Contains(be.Message, tc.wantCode) {
				t.Fatalf("message %q does not name the STS error %s", be.Message, tc.wantCode)
			}
			for _, secret := range []string{"CANARY-wrong-secret-9d2e", w.m.RootPassword} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("error leaks a secret: %v", err)
				}
			}
		})
	}
}

// Default chain: the broker's base credentials come from the environment,
// as they would from an instance role or a shared config.
func TestSTSDefaultChain(t *testing.T) {
	w := newSTSWorld(t)
	t.Setenv("AWS_ACCESS_KEY_ID", w.m.RootUser)
	t.Setenv("AWS_SECRET_ACCESS_KEY", w.m.RootPassword)
	t.Setenv("AWS_CONFIG_FILE", "/nonexistent")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
	src, err := NewSTS(context.Background(), "aws-ci", STSOptions{RoleARN: testRole, Endpoint: w.m.Endpoint, HTTPClient: w.client})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"}); err != nil {
		t.Fatalf("Credential with the default chain: %v", err)
	}
}

// Concurrent first requests for one key make one STS call; a different
// session policy is a different key (T-B7).
func TestSTSCacheOneCallPerKey(t *testing.T) {
	w := newSTSWorld(t)
	src := w.source(t, STSOptions{})
	policyFor := func(_ context.Context, _ broker.Identity, tg broker.Target) (map[string]string, error) {
		bucket := strings.Split(strings.TrimPrefix(tg.Path, "/"), "/")[0]
		return map[string]string{ParamSessionPolicy: `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":["arn:aws:s3:::` + bucket + `/*"]}]}`}, nil
	}
	cached := WithParams(NewCache("aws-ci", src, CacheOptions{TTL: time.Hour}), policyFor)
	get := func(path string, id broker.Identity) broker.Credential {
		c, err := cached.Credential(context.Background(), id, broker.Grant{Credential: "aws-ci", Rule: "r",
			Target: broker.Target{Path: path}})
		if err != nil {
			t.Errorf("Credential: %v", err)
		}
		return c
	}
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); get("/bucket-a/x", ciIdentity) }()
	}
	wg.Wait()
	if n := w.rt.calls.Load(); n != 1 {
		t.Fatalf("100 concurrent first requests made %d STS calls, want 1", n)
	}
	a := get("/bucket-a/y", ciIdentity)
	b := get("/bucket-b/x", ciIdentity)
	other := get("/bucket-a/x", broker.Identity{ID: "spiffe://example.org/other", Method: "spiffe-x509"})
	if n := w.rt.calls.Load(); n != 3 {
		t.Fatalf("STS calls = %d, want 3 (one per policy and identity)", n)
	}
	ak := func(c broker.Credential) string { s, _ := c.Field(broker.FieldAccessKeyID); return s.Reveal() }
	if ak(a) == ak(b) || ak(a) == ak(other) {
		t.Fatal("different policies or identities shared a credential")
	}
}

type errToken struct{}

func (errToken) Token(context.Context) (broker.Secret, error) {
	return broker.Secret{}, errors.New("workload api unavailable")
}

func TestSTSWebIdentityTokenErrorMakesNoCall(t *testing.T) {
	w := newSTSWorld(t)
	src := w.source(t, STSOptions{WebIdentity: errToken{}})
	_, err := src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	if err == nil || !strings.Contains(err.Error(), "web identity token") {
		t.Fatalf("error = %v", err)
	}
	if n := w.rt.calls.Load(); n != 0 {
		t.Fatalf("%d STS calls without a token", n)
	}
}

func TestSessionName(t *testing.T) {
	long := "spiffe://example.org/" + strings.Repeat("a", 80)
	tests := []struct {
		id, want string
	}{
		{"spiffe://example.org/ci/build", "example.org-ci-build"},
		{"repo:acme/app:ref:refs/heads/main", "repo-acme-app-ref-refs-heads-main"},
		{"user@example.com", "user@example.com"},
		{"", "keygate"},
		{"a", "keygate"},
		{"aws:thing", "aws-thing"}, // ':' is outside the set, so the reserved aws: prefix cannot occur
	}
	for _, tc := range tests {
		t.Run(tc.id, func(t *testing.T) {
			if got := SessionName(broker.Identity{ID: tc.id}); got != tc.want {
				t.Fatalf("SessionName(%q) = %q, want %q", tc.id, got, tc.want)
			}
		})
	}
	t.Run("long", func(t *testing.T) {
		a := SessionName(broker.Identity{ID: long})
		b := SessionName(broker.Identity{ID: long + "b"})
		if len(a) > 64 || len(b) > 64 || a == b {
			t.Fatalf("long names %q %q: want <= 64 chars and distinct", a, b)
		}
	})
}

func TestSessionTagsValidation(t *testing.T) {
	tests := []struct {
		name    string
		params  map[string]string
		wantErr string
	}{
		{"ok", map[string]string{ParamTagPrefix + "team": "payments", ParamTagPrefix + "repo": "acme/app"}, ""},
		{"empty value ok", map[string]string{ParamTagPrefix + "team": ""}, ""},
		{"bad value char", map[string]string{ParamTagPrefix + "team": "CANARY<script>"}, "outside STS's tag set"},
		{"value too long", map[string]string{ParamTagPrefix + "team": strings.Repeat("x", 257)}, "longer than 256"},
		{"bad key", map[string]string{ParamTagPrefix + "te am!": "x"}, "tag key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := sessionTags(tc.params)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error = %v, want %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "CANARY") {
				t.Fatalf("error echoes the value: %v", err)
			}
		})
	}
}

func TestValidateRoleARN(t *testing.T) {
	for _, ok := range []string{testRole, "arn:aws-cn:iam::123456789012:role/path/ci", "arn:minio:iam:::role/dI1ltL3iR4ow", "arn:minio:iam:us-east-1::role/x"} {
		if err := ValidateRoleARN(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "ci", "arn:aws:iam::123:role/ci", "arn:aws:iam:us-east-1:123456789012:role/ci", "arn:aws:s3:::bucket", "arn:aws:iam::123456789012:user/ci", "arn:aws:iam::123456789012:role/"} {
		if err := ValidateRoleARN(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestNewSTSDuration(t *testing.T) {
	for _, d := range []time.Duration{time.Minute, 13 * time.Hour} {
		if _, err := NewSTS(context.Background(), "x", STSOptions{RoleARN: testRole, Duration: d, Credentials: aws.AnonymousCredentials{}}); err == nil {
			t.Errorf("duration %s accepted", d)
		}
	}
}

// oidcIssuer is a minimal OpenID provider (discovery + JWKS) for MinIO to
// verify the broker's own web identity token. A test-local issuer: Dex does
// not build here (../shared/TESTING.md), and MinIO's verification code,
// which is what matters, is real.
type oidcIssuer struct {
	srv *httptest.Server
	key *rsa.PrivateKey
}

func newOIDCIssuer(t *testing.T) *oidcIssuer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	is := &oidcIssuer{key: key}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{
			"issuer": is.srv.URL, "jwks_uri": is.srv.URL + "/jwks",
			"authorization_endpoint": is.srv.URL + "/auth", "token_endpoint": is.srv.URL + "/token",
			"response_types_supported": []string{"id_token"}, "subject_types_supported": []string{"public"},
			"id_token_signing_alg_values_supported": []string{"RS256"},
		})
	})
	mux.HandleFunc("/jwks", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: "k1", Algorithm: "RS256", Use: "sig"}}})
	})
	is.srv = httptest.NewServer(mux)
	t.Cleanup(is.srv.Close)
	return is
}

func (is *oidcIssuer) mint(t *testing.T, claims map[string]any) string {
	t.Helper()
	return signJWTKid(t, is.key, "k1", claims)
}

// The broker holds no AWS key at all: it trades its own token (here a
// projected-token file) for the session, and MinIO verifies that token
// against the issuer.
func TestSTSWebIdentityMinIO(t *testing.T) {
	is := newOIDCIssuer(t)
	m := testservers.StartMinIO(t, testservers.MinIOOptions{Env: []string{
		"MINIO_IDENTITY_OPENID_CONFIG_URL=" + is.srv.URL + "/.well-known/openid-configuration",
		"MINIO_IDENTITY_OPENID_CLIENT_ID=sts.amazonaws.com",
		"MINIO_IDENTITY_OPENID_CLAIM_NAME=policy",
	}})
	w := &stsWorld{m: m}
	w.rt = &countingTransport{rt: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: m.CAPool}}}
	w.client = &http.Client{Transport: w.rt}
	now := time.Now()
	tokFile := filepath.Join(t.TempDir(), "token")
	writeToken := func(sub string) {
		tok := is.mint(t, map[string]any{"iss": is.srv.URL, "sub": sub, "aud": "sts.amazonaws.com",
			"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "policy": "readwrite"})
		if err := os.WriteFile(tokFile, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeToken("system:serviceaccount:keygate:broker")
	src, err := NewSTS(context.Background(), "aws-ci", STSOptions{RoleARN: testRole, Endpoint: m.Endpoint,
		HTTPClient: w.client, WebIdentity: FileToken(tokFile)})
	if err != nil {
		t.Fatal(err)
	}
	c, err := src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	if err != nil {
		t.Fatalf("AssumeRoleWithWebIdentity: %v", err)
	}
	if _, err := w.s3With(c).CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String("web-identity")}); err != nil {
		t.Fatalf("CreateBucket with the web-identity session: %v", err)
	}
	// A token MinIO's issuer did not sign is refused, and the refusal is a 503.
	other := newOIDCIssuer(t)
	forged := other.mint(t, map[string]any{"iss": is.srv.URL, "sub": "x", "aud": "sts.amazonaws.com",
		"iat": now.Unix(), "exp": now.Add(time.Hour).Unix(), "policy": "readwrite"})
	if err := os.WriteFile(tokFile, []byte(forged), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	var be *broker.Error
	if !errors.As(err, &be) || be.Code != broker.CodeCredentialUnavailable || !strings.Contains(be.Message, "AssumeRoleWithWebIdentity") {
		t.Fatalf("forged token: error = %v, want credential_unavailable naming AssumeRoleWithWebIdentity", err)
	}
	if strings.Contains(err.Error(), forged) {
		t.Fatal("the error contains the token")
	}
}

// STS throttling cannot be provoked on MinIO, so this one test fakes STS
// with an httptest server answering STS's documented Throttling error; the
// SDK's real client parses it.
func TestSTSThrottlingRetryAfter(t *testing.T) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>`+
			`<Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>x</RequestId></ErrorResponse>`)
	}))
	defer srv.Close()
	src, err := NewSTS(context.Background(), "aws-ci", STSOptions{RoleARN: testRole, Endpoint: srv.URL,
		Credentials: credentials.NewStaticCredentialsProvider("AKID", "CANARY-secret-throttle", "")})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.Credential(context.Background(), ciIdentity, broker.Grant{Credential: "aws-ci"})
	var be *broker.Error
	if !errors.As(err, &be) || be.Code != broker.CodeCredentialUnavailable || be.RetryAfter != time.Second ||
		!strings.Contains(be.Message, "Throttling") {
		t.Fatalf("error = %#v, want credential_unavailable with Retry-After 1s naming Throttling", err)
	}
	// At most one retry: a throttling STS is not hammered.
	if n := calls.Load(); n > 2 {
		t.Fatalf("%d STS calls for one credential, want at most 2", n)
	}
	if strings.Contains(err.Error(), "CANARY") {
		t.Fatal("the error contains the base secret")
	}
}
