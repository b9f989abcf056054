package dbproxy

// RDS IAM authentication. No RDS instance can run here, and PostgreSQL
// itself cannot check an IAM token (RDS does that in its own
// authentication hook), so:
//
//   - TestRDSAuthToken checks the token itself: a SigV4 presigned URL for
//     rds-db:connect that verifies against the aws_sts keys when recomputed
//     with aws-sdk-go-v2's v4 signer, carrying the session token;
//   - TestRDSIAMSession runs a session through the broker against fakePG
//     over TLS, which plays RDS's part of the login (asks for a cleartext
//     password) and records the password, which the test verifies the same
//     way; no token may reach a server that TLS did not verify, or one that
//     asks for SCRAM or MD5.

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

const (
	testAKID    = "ASIAKEYGATETEST00001"
	testSecret  = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	testSession = "FwoGZXIvYXdzEXAMPLE//session+token="
)

// stsCred is what an aws_sts source hands out.
func stsCred(expires time.Time) broker.Credential {
	return broker.Credential{Name: "orders-sts", Kind: "aws_sts", Expires: expires,
		Meta: map[string]string{"role": "arn:aws:iam::123456789012:role/orders-db"},
		Fields: map[string]broker.Secret{
			broker.FieldAccessKeyID:     broker.NewSecret(testAKID),
			broker.FieldSecretAccessKey: broker.NewSecret(testSecret),
			broker.FieldSessionToken:    broker.NewSecret(testSession),
		}}
}

// stsSource hands out stsCred, the Meta map shared between calls as a
// cache's would be.
type stsSource struct {
	c     broker.Credential
	mu    sync.Mutex
	calls int
}

func (s *stsSource) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	s.mu.Lock()
	s.calls++
	s.mu.Unlock()
	return s.c, nil
}

// verifyRDSToken checks token as RDS would: a presigned GET of
// https://endpoint/?Action=connect&DBUser=user for service rds-db in
// region, signed by testAKID/testSecret with testSession, within its 900
// seconds. The signature is recomputed with the SDK's v4 signer from the
// known secret at the token's own X-Amz-Date.
func verifyRDSToken(t testing.TB, token, endpoint, region, user string) {
	t.Helper()
	// host:port?query (aws-sdk-go-v2; v1 and the CLI add a "/").
	if !strings.HasPrefix(token, endpoint+"?") && !strings.HasPrefix(token, endpoint+"/?") {
		t.Fatalf("the token is not host:port?query for %s: %.60s...", endpoint, token)
	}
	u, err := url.Parse("https://" + token)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	want := map[string]string{
		"Action": "connect", "DBUser": user, "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
		"X-Amz-Expires": "900", "X-Amz-SignedHeaders": "host", "X-Amz-Security-Token": testSession,
	}
	for k, v := range want {
		if q.Get(k) != v {
			t.Errorf("token %s = %q, want %q", k, q.Get(k), v)
		}
	}
	ts, err := time.Parse("20060102T150405Z", q.Get("X-Amz-Date"))
	if err != nil || time.Since(ts) > time.Minute || time.Until(ts) > time.Minute {
		t.Fatalf("X-Amz-Date %q is not now (%v)", q.Get("X-Amz-Date"), err)
	}
	if c, want := q.Get("X-Amz-Credential"), testAKID+"/"+ts.Format("20060102")+"/"+region+"/rds-db/aws4_request"; c != want {
		t.Fatalf("X-Amz-Credential = %q, want %q", c, want)
	}
	got := q.Get("X-Amz-Signature")
	// What was signed: the URL before the signer added its parameters.
	for _, k := range []string{"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Security-Token", "X-Amz-Signature"} {
		q.Del(k)
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	sign := func(secret string) string {
		creds := aws.Credentials{AccessKeyID: testAKID, SecretAccessKey: secret, SessionToken: testSession}
		signed, _, err := v4.NewSigner().PresignHTTP(context.Background(), creds, req,
			"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "rds-db", region, ts)
		if err != nil {
			t.Fatal(err)
		}
		su, _ := url.Parse(signed)
		return su.Query().Get("X-Amz-Signature")
	}
	if len(got) != 64 || got != sign(testSecret) {
		t.Fatalf("the token's signature %q does not verify with the aws_sts secret", got)
	}
	if got == sign("not-"+testSecret) {
		t.Fatal("the verifier accepts any secret")
	}
}

func TestRDSAuthToken(t *testing.T) {
	ctx := context.Background()
	endpoint := "orders.abc123.eu-west-1.rds.amazonaws.com:5432"
	tok, err := rdsAuthToken(ctx, endpoint, "eu-west-1", "app_user", stsCred(time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	verifyRDSToken(t, tok.Reveal(), endpoint, "eu-west-1", "app_user")
	if s := tok.String(); strings.Contains(s, "X-Amz") {
		t.Fatalf("the token prints: %s", s)
	}

	// Another region, another user: another token that verifies only as such.
	tok2, err := rdsAuthToken(ctx, endpoint, "us-east-1", "reporting", stsCred(time.Time{}))
	if err != nil {
		t.Fatal(err)
	}
	verifyRDSToken(t, tok2.Reveal(), endpoint, "us-east-1", "reporting")

	// A credential without AWS keys (a static username/password) signs nothing.
	if _, err := rdsAuthToken(ctx, endpoint, "eu-west-1", "app_user", broker.Credential{Kind: "static",
		Fields: map[string]broker.Secret{broker.FieldUsername: broker.NewSecret("u"), broker.FieldPassword: broker.NewSecret("p")}}); err == nil {
		t.Fatal("a credential without access keys signed a token")
	}
}

func TestRDSIAMNeedsVerifyFull(t *testing.T) {
	for _, mode := range []TLSMode{TLSRequire, TLSDisable} {
		_, err := New(Options{Pipeline: &broker.Pipeline{}, Dialer: newCountingDialer(), Logger: zap.NewNop(),
			Database: Database{Name: "orders", Upstream: "db.internal:5432", Credential: "sts", TLS: mode,
				RDSIAM: &RDSIAM{User: "app", Region: "eu-west-1"}}})
		if err == nil || !strings.Contains(err.Error(), "verify-full") {
			t.Fatalf("tls %s: New = %v, want a verify-full refusal", mode, err)
		}
	}
	_, err := New(Options{Pipeline: &broker.Pipeline{}, Dialer: newCountingDialer(), Logger: zap.NewNop(),
		Database: Database{Name: "orders", Upstream: "db.internal:5432", Credential: "sts",
			RDSIAM: &RDSIAM{Region: "eu-west-1"}}})
	if err == nil {
		t.Fatal("rds_iam without a user was accepted")
	}
}

// cleartextAuth asks for a cleartext password (as RDS does for an rds_iam
// role) and keeps what it gets.
func cleartextAuth(got chan<- string) func(be *pgproto3.Backend) bool {
	return func(be *pgproto3.Backend) bool {
		be.Send(&pgproto3.AuthenticationCleartextPassword{})
		if be.Flush() != nil {
			return false
		}
		if err := be.SetAuthType(pgproto3.AuthTypeCleartextPassword); err != nil {
			return false
		}
		msg, err := be.Receive()
		if err != nil {
			return false
		}
		pm, ok := msg.(*pgproto3.PasswordMessage)
		if !ok {
			return false
		}
		got <- pm.Password
		return true
	}
}

func TestRDSIAMSession(t *testing.T) {
	const name = "orders.abc123.eu-west-1.rds.amazonaws.com" // the name RDS's certificate carries
	serverTLS, pool := leafFor(t, name)
	fake := startFakePG(t, serverTLS)
	got := make(chan string, 4)
	fake.authFn = cleartextAuth(got)
	endpoint := name + ":" + strings.Split(fake.addr(), ":")[1]

	// The aws_sts credential expires in 1.5 s: the session must outlive it
	// (and the token): they authenticate only the login.
	src := &stsSource{c: stsCred(time.Now().Add(1500 * time.Millisecond))}
	b := startBroker(t, brokerSpec{
		db: Database{Name: "orders", Upstream: fake.addr(), Credential: "orders-sts", TLS: TLSVerifyFull,
			RootCAs: pool, ServerName: name, RDSIAM: &RDSIAM{User: "app_user", Region: "eu-west-1"}},
		sources: map[string]broker.Source{"orders-sts": src},
	})
	c, err := pgxConnect(t, b.dsn("postgres", "app"))
	if err != nil {
		t.Fatal(err)
	}
	var token string
	select {
	case token = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("the server received no password")
	}
	verifyRDSToken(t, token, endpoint, "eu-west-1", "app_user")
	if st := fake.startups(); len(st) != 1 || st[0]["user"] != "app_user" || st[0]["database"] != "app" {
		t.Fatalf("upstream startup = %v, want user app_user on app", st)
	}

	time.Sleep(2 * time.Second) // past the credential's expiry
	if _, err := c.Exec(context.Background(), ";"); err != nil {
		t.Fatalf("the session ended with the aws_sts credential's expiry: %v", err)
	}
	c.Close(context.Background())

	a := b.waitAudit(t, 1)[0]
	if a["decision"] != "allow" || a["credential.kind"] != "aws_sts" || a["credential.rds_iam_user"] != "app_user" ||
		a["credential.role"] != "arn:aws:iam::123456789012:role/orders-db" {
		t.Fatalf("audit line: %v", a)
	}
	if _, shared := src.c.Meta["rds_iam_user"]; shared {
		t.Fatal("the session wrote into the source's (cached) Meta map")
	}
	logs := b.logs.String()
	for _, s := range []string{token, testSecret, testSession, "X-Amz-Signature"} {
		if strings.Contains(logs, s) {
			t.Fatalf("the log holds a secret (%.20s...):\n%s", s, logs)
		}
	}
}

// A token goes only to a server that verify-full TLS verified, and only in
// answer to a cleartext password request.
func TestRDSIAMNoTokenUnverified(t *testing.T) {
	const name = "orders.abc123.eu-west-1.rds.amazonaws.com"
	t.Run("certificate for another name", func(t *testing.T) {
		serverTLS, pool := leafFor(t, "evil.example.com")
		fake := startFakePG(t, serverTLS)
		got := make(chan string, 1)
		fake.authFn = cleartextAuth(got)
		b := startBroker(t, brokerSpec{
			db: Database{Name: "orders", Upstream: fake.addr(), Credential: "orders-sts", TLS: TLSVerifyFull,
				RootCAs: pool, ServerName: name, RDSIAM: &RDSIAM{User: "app_user", Region: "eu-west-1"}},
			sources: map[string]broker.Source{"orders-sts": &stsSource{c: stsCred(time.Now().Add(time.Hour))}},
		})
		if _, err := pgxConnect(t, b.dsn("postgres", "app")); err == nil {
			t.Fatal("connected through a server whose certificate did not verify")
		}
		if len(got) != 0 || bytes.Contains(fake.received(), []byte("Action=connect")) || len(fake.startups()) != 0 {
			t.Fatal("the unverified server received the startup or the token")
		}
		if a := b.waitAudit(t, 1)[0]; a["error"] == nil || !strings.Contains(a["error"].(string), "upstream_tls") {
			t.Fatalf("audit line: %v", a)
		}
	})
	t.Run("server asks for md5", func(t *testing.T) {
		serverTLS, pool := leafFor(t, name)
		fake := startFakePG(t, serverTLS)
		answered := make(chan pgproto3.FrontendMessage, 1)
		fake.authFn = func(be *pgproto3.Backend) bool {
			be.Send(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}})
			_ = be.Flush()
			_ = be.SetAuthType(pgproto3.AuthTypeMD5Password)
			msg, _ := be.Receive() // the broker closes instead of answering
			answered <- msg
			return false
		}
		b := startBroker(t, brokerSpec{
			db: Database{Name: "orders", Upstream: fake.addr(), Credential: "orders-sts", TLS: TLSVerifyFull,
				RootCAs: pool, ServerName: name, RDSIAM: &RDSIAM{User: "app_user", Region: "eu-west-1"}},
			sources: map[string]broker.Source{"orders-sts": &stsSource{c: stsCred(time.Now().Add(time.Hour))}},
		})
		_, err := pgxConnect(t, b.dsn("postgres", "app"))
		if err == nil {
			t.Fatal("connected to a server that asked for md5")
		}
		a := b.waitAudit(t, 1)[0]
		if e, _ := a["error"].(string); !strings.Contains(e, "rds_iam") {
			t.Fatalf("audit error %q does not say the server is not checking IAM tokens", e)
		}
		select {
		case msg := <-answered:
			if msg != nil {
				t.Fatalf("the broker answered md5 with %T", msg)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the fake server saw no answer and no close")
		}
		if bytes.Contains(fake.received(), []byte("Action=connect")) || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the token reached the server (or the client hung: %v)", err)
		}
	})
}
