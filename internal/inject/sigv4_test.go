package inject

// The sigv4 tests check signatures with a test-local verifier: an httptest
// TLS server that recomputes the signature from the request exactly as it
// arrived (host, the headers named in SignedHeaders, X-Amz-Date, the body
// hash) and compares. It is a fake, used because the real SigV4 server the
// integration tests run (MinIO) verifies only S3 and STS-on-MinIO
// signatures, not dynamodb, execute-api or AWS STS scopes, and there is no
// network to AWS here. The verifier recomputes with the same aws-sdk-go-v2
// signer, so what it proves is that the request on the wire (after the Go
// transport's HTTP/1.1 or HTTP/2 framing, host and header handling) is the
// request that was signed, with the inferred scope and the right secret. That
// the library's algorithm agrees with AWS is checked separately against a
// published AWS test-suite vector (TestSigV4KnownVector) and, for S3, by the
// MinIO integration tests.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/keygate/broker/internal/broker"
)

type sigv4FixedClock struct{ t time.Time }

func (c sigv4FixedClock) Now() time.Time { return c.t }

var sigv4TestTime = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)

const (
	testAKID   = "AKIAKEYGATETEST00001"
	testSecret = "kgTestSecret/abcdefghijklmnopqrstuvwxyz0123"
)

func awsCred(akid, secret, token string) broker.Credential {
	f := map[string]string{broker.FieldAccessKeyID: akid, broker.FieldSecretAccessKey: secret}
	if token != "" {
		f[broker.FieldSessionToken] = token
	}
	return cred(f)
}

func mustSigV4(t testing.TB, o SigV4Options) broker.Injector {
	t.Helper()
	if o.Clock == nil {
		o.Clock = sigv4FixedClock{sigv4TestTime}
	}
	in, err := SigV4(o)
	if err != nil {
		t.Fatalf("SigV4(%+v): %v", o, err)
	}
	return in
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// ---- the verifier

type sigv4Auth struct {
	AKID, Date, Region, Service string
	SignedHeaders               []string
	Signature                   string
}

func parseSigV4Auth(v string) (sigv4Auth, error) {
	var a sigv4Auth
	rest, ok := strings.CutPrefix(v, "AWS4-HMAC-SHA256 ")
	if !ok {
		return a, errors.New("not AWS4-HMAC-SHA256")
	}
	parts := strings.Split(rest, ", ")
	if len(parts) != 3 {
		return a, fmt.Errorf("want 3 parts, got %d", len(parts))
	}
	credStr, ok1 := strings.CutPrefix(parts[0], "Credential=")
	sh, ok2 := strings.CutPrefix(parts[1], "SignedHeaders=")
	sig, ok3 := strings.CutPrefix(parts[2], "Signature=")
	if !ok1 || !ok2 || !ok3 {
		return a, errors.New("malformed parts")
	}
	cs := strings.Split(credStr, "/")
	if len(cs) != 5 || cs[4] != "aws4_request" {
		return a, errors.New("malformed credential scope")
	}
	a.AKID, a.Date, a.Region, a.Service = cs[0], cs[1], cs[2], cs[3]
	a.SignedHeaders = strings.Split(sh, ";")
	a.Signature = sig
	return a, nil
}

// verifySigV4 checks the signature of recv, a request as a server read it,
// whose body was body. secrets maps access key ids to secrets.
func verifySigV4(recv *http.Request, body []byte, secrets map[string]string) (sigv4Auth, error) {
	auths := recv.Header.Values("Authorization")
	if len(auths) != 1 {
		return sigv4Auth{}, fmt.Errorf("%d Authorization values", len(auths))
	}
	a, err := parseSigV4Auth(auths[0])
	if err != nil {
		return a, err
	}
	secret, ok := secrets[a.AKID]
	if !ok {
		return a, errors.New("unknown access key id")
	}
	dates := recv.Header.Values("X-Amz-Date")
	if len(dates) != 1 {
		return a, fmt.Errorf("%d X-Amz-Date values", len(dates))
	}
	ts, err := time.Parse("20060102T150405Z", dates[0])
	if err != nil || ts.Format("20060102") != a.Date {
		return a, errors.New("X-Amz-Date does not match the credential scope")
	}
	u, err := url.ParseRequestURI(recv.RequestURI)
	if err != nil {
		return a, fmt.Errorf("request URI: %w", err)
	}
	// No scheme: the signer would otherwise strip a port it deems default
	// from the host, and a server verifies the Host header as received.
	req := &http.Request{
		Method: recv.Method,
		URL:    &url.URL{Host: recv.Host, Path: u.Path, RawPath: u.RawPath, RawQuery: u.RawQuery},
		Host:   recv.Host,
		Header: http.Header{},
	}
	signed := map[string]bool{}
	for _, name := range a.SignedHeaders {
		signed[name] = true
		switch name {
		case "host":
		case "content-length":
			if recv.ContentLength <= 0 {
				return a, errors.New("content-length signed but not received")
			}
			req.ContentLength = recv.ContentLength
		default:
			vals := recv.Header.Values(name)
			if len(vals) == 0 {
				return a, fmt.Errorf("signed header %s not received", name)
			}
			req.Header[http.CanonicalHeaderKey(name)] = vals
		}
	}
	if !signed["host"] || !signed["x-amz-date"] {
		return a, errors.New("host or x-amz-date not signed")
	}
	token := recv.Header.Get("X-Amz-Security-Token")
	if token != "" && !signed["x-amz-security-token"] {
		return a, errors.New("X-Amz-Security-Token sent but not signed")
	}
	payload := sha256Hex(body)
	if ph := recv.Header.Get("X-Amz-Content-Sha256"); ph != "" {
		if len(ph) == 64 && ph != payload {
			return a, errors.New("X-Amz-Content-Sha256 does not match the body")
		}
		payload = ph
	}
	signer := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = a.Service == "s3" })
	creds := aws.Credentials{AccessKeyID: a.AKID, SecretAccessKey: secret, SessionToken: token}
	if err := signer.SignHTTP(context.Background(), creds, req, payload, a.Service, a.Region, ts); err != nil {
		return a, err
	}
	if got := req.Header.Get("Authorization"); got != auths[0] {
		return a, fmt.Errorf("signature mismatch: received %q, recomputed %q", auths[0], got)
	}
	return a, nil
}

// wireVerify serialises r as the HTTP/1.1 transport would, parses it as a
// server would, and verifies the signature.
func wireVerify(t testing.TB, r *http.Request, secrets map[string]string) (sigv4Auth, *http.Request, error) {
	t.Helper()
	recv, body, err := overTheWire(r)
	if err != nil {
		t.Fatal(err)
	}
	a, err := verifySigV4(recv, body, secrets)
	return a, recv, err
}

// overTheWire returns r and its body as a server reads them.
func overTheWire(r *http.Request) (*http.Request, []byte, error) {
	var buf bytes.Buffer
	if err := r.Write(&buf); err != nil {
		return nil, nil, fmt.Errorf("r.Write: %w", err)
	}
	recv, err := http.ReadRequest(bufio.NewReader(&buf))
	if err != nil {
		return nil, nil, fmt.Errorf("ReadRequest: %w", err)
	}
	body, err := io.ReadAll(recv.Body)
	if err != nil {
		return nil, nil, fmt.Errorf("read body: %w", err)
	}
	return recv, body, nil
}

type sigv4Verdict struct {
	Valid         bool
	Reason        string
	Service       string
	Region        string
	SignedHeaders []string
	Proto         int
	Host          string
	AuthCount     int
	Token         []string
	ContentSHA    []string
	BodySHA       string
	BodyLen       int
	Headers       http.Header
}

// selfSignedFor returns a certificate for names and a pool trusting it.
func selfSignedFor(t *testing.T, names ...string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "sigv4 verifier"},
		DNSNames:              names,
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

var verifierHosts = []string{
	"dynamodb.us-west-2.amazonaws.com",
	"abc123.execute-api.eu-west-1.amazonaws.com",
	"sts.amazonaws.com",
	"sts.us-east-2.amazonaws.com",
	"bucket.s3.us-west-2.amazonaws.com",
	"s3.us-west-2.amazonaws.com",
}

// newSigV4Verifier starts the verifier (HTTP/1.1 and HTTP/2 over TLS) and
// returns clients for each protocol that dial it for any AWS host name.
func newSigV4Verifier(t *testing.T, secrets map[string]string) (h1, h2 *http.Client) {
	t.Helper()
	cert, pool := selfSignedFor(t, verifierHosts...)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		v := sigv4Verdict{
			Proto: r.ProtoMajor, Host: r.Host, AuthCount: len(r.Header.Values("Authorization")),
			Token: r.Header.Values("X-Amz-Security-Token"), ContentSHA: r.Header.Values("X-Amz-Content-Sha256"),
			BodySHA: sha256Hex(body), BodyLen: len(body), Headers: r.Header,
		}
		if err != nil {
			v.Reason = "reading body: " + err.Error()
		} else {
			a, err := verifySigV4(r, body, secrets)
			v.Service, v.Region, v.SignedHeaders = a.Service, a.Region, a.SignedHeaders
			if err != nil {
				v.Reason = err.Error()
			} else {
				v.Valid = true
			}
		}
		w.Header().Set("Content-Type", "application/json")
		if !v.Valid {
			w.WriteHeader(http.StatusForbidden)
		}
		_ = json.NewEncoder(w).Encode(v)
	}))
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	client := func(h2 bool) *http.Client {
		tr := &http.Transport{
			// Every AWS name resolves to the verifier; the URL, Host and SNI
			// keep the AWS name.
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			},
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			ForceAttemptHTTP2: h2,
		}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr}
	}
	return client(false), client(true)
}

func sendToVerifier(t *testing.T, c *http.Client, r *http.Request) (int, sigv4Verdict) {
	t.Helper()
	resp, err := c.Do(r)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	defer resp.Body.Close()
	var v sigv4Verdict
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatalf("decode verdict: %v", err)
	}
	return resp.StatusCode, v
}

// incoming parses raw as the broker's listener would (server side) and
// makes the URL absolute as goproxy does for an intercepted request.
func incoming(t *testing.T, raw string) *http.Request {
	t.Helper()
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
	if err != nil {
		t.Fatalf("ReadRequest: %v", err)
	}
	r.URL.Scheme, r.URL.Host, r.RequestURI = "https", r.Host, ""
	return r
}

func newBodyReq(t *testing.T, method, rawURL string, body []byte) *http.Request {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	r, err := http.NewRequest(method, rawURL, rd)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// awsChunked encodes data as an aws-chunked body with a CRC32 trailer (the
// STREAMING-UNSIGNED-PAYLOAD-TRAILER framing).
func awsChunked(data []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n", len(data), data)
	return b.Bytes()
}

func TestSigV4ThroughTransport(t *testing.T) {
	secrets := map[string]string{testAKID: testSecret}
	h1, h2 := newSigV4Verifier(t, secrets)
	good := awsCred(testAKID, testSecret, "")
	withToken := awsCred(testAKID, testSecret, "FwoGZXIvYXdzEXAMPLETOKEN//+=")
	chunked := awsChunked([]byte("hello streaming world"))

	cases := []struct {
		name            string
		cred            broker.Credential
		opts            SigV4Options
		req             func(t *testing.T) *http.Request
		service, region string
		check           func(t *testing.T, v sigv4Verdict)
	}{
		{
			name: "dynamodb POST JSON, body hashed, no content-sha256 header added",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "POST", "https://dynamodb.us-west-2.amazonaws.com/", []byte(`{"TableName":"orders"}`))
				r.Header.Set("Content-Type", "application/x-amz-json-1.0")
				r.Header.Set("X-Amz-Target", "DynamoDB_20120810.DescribeTable")
				return r
			},
			service: "dynamodb", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if len(v.ContentSHA) != 0 {
					t.Errorf("X-Amz-Content-Sha256 added for dynamodb: %q", v.ContentSHA)
				}
				if !contains(v.SignedHeaders, "x-amz-target") || !contains(v.SignedHeaders, "content-length") {
					t.Errorf("signed headers %q lack x-amz-target or content-length", v.SignedHeaders)
				}
			},
		},
		{
			name: "execute-api GET, escaped path and query",
			cred: good,
			req: func(t *testing.T) *http.Request {
				return newBodyReq(t, "GET", "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/items/a%20b%2Fc?y=hello%20world&x=1&x=0&e=", nil)
			},
			service: "execute-api", region: "eu-west-1",
		},
		{
			name: "global STS, form POST",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "POST", "https://sts.amazonaws.com/", []byte("Action=GetCallerIdentity&Version=2011-06-15"))
				r.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
				return r
			},
			service: "sts", region: "us-east-1",
		},
		{
			name: "regional STS with session token",
			cred: withToken,
			req: func(t *testing.T) *http.Request {
				return newBodyReq(t, "GET", "https://sts.us-east-2.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15", nil)
			},
			service: "sts", region: "us-east-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if len(v.Token) != 1 || v.Token[0] != "FwoGZXIvYXdzEXAMPLETOKEN//+=" {
					t.Errorf("X-Amz-Security-Token received %q", v.Token)
				}
			},
		},
		{
			name: "S3 virtual-hosted PUT, body hashed into X-Amz-Content-Sha256",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "PUT", "https://bucket.s3.us-west-2.amazonaws.com/dir/my%20key+(1).txt", []byte("object body"))
				r.Header.Set("X-Amz-Meta-Owner", "team  a")
				return r
			},
			service: "s3", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if len(v.ContentSHA) != 1 || v.ContentSHA[0] != sha256Hex([]byte("object body")) {
					t.Errorf("X-Amz-Content-Sha256 %q, want the body hash", v.ContentSHA)
				}
			},
		},
		{
			name: "S3 path-style ListObjectsV2 query with + and %2F",
			cred: good,
			req: func(t *testing.T) *http.Request {
				return newBodyReq(t, "GET", "https://s3.us-west-2.amazonaws.com/bucket?list-type=2&prefix=a+b%2Fc&delimiter=%2F", nil)
			},
			service: "s3", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if len(v.ContentSHA) != 1 || v.ContentSHA[0] != emptySHA256 {
					t.Errorf("X-Amz-Content-Sha256 %q, want the empty hash", v.ContentSHA)
				}
			},
		},
		{
			name: "S3 UNSIGNED-PAYLOAD kept",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "PUT", "https://bucket.s3.us-west-2.amazonaws.com/k", []byte("unsigned body"))
				r.Header["x-amz-content-sha256"] = []string{"UNSIGNED-PAYLOAD"}
				return r
			},
			service: "s3", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if len(v.ContentSHA) != 1 || v.ContentSHA[0] != "UNSIGNED-PAYLOAD" {
					t.Errorf("X-Amz-Content-Sha256 %q", v.ContentSHA)
				}
			},
		},
		{
			name: "S3 STREAMING-UNSIGNED-PAYLOAD-TRAILER (SDK PutObject over TLS)",
			cred: withToken,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "PUT", "https://bucket.s3.us-west-2.amazonaws.com/k", chunked)
				r.Header.Set("X-Amz-Content-Sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
				r.Header.Set("Content-Encoding", "aws-chunked")
				r.Header.Set("X-Amz-Trailer", "x-amz-checksum-crc32")
				r.Header.Set("X-Amz-Decoded-Content-Length", "21")
				r.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=DUMMY/20200101/us-west-2/s3/aws4_request, SignedHeaders=host, Signature=00")
				r.Header.Set("X-Amz-Security-Token", "dummy")
				return r
			},
			service: "s3", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				for _, h := range []string{"content-encoding", "x-amz-trailer", "x-amz-decoded-content-length", "x-amz-content-sha256"} {
					if !contains(v.SignedHeaders, h) {
						t.Errorf("%s not signed: %q", h, v.SignedHeaders)
					}
				}
				if v.BodySHA != sha256Hex(chunked) || v.Headers.Get("Content-Encoding") != "aws-chunked" {
					t.Errorf("aws-chunked body or Content-Encoding changed")
				}
			},
		},
		{
			name: "explicit default port is stripped from the signed and sent host",
			cred: good,
			req: func(t *testing.T) *http.Request {
				return newBodyReq(t, "GET", "https://dynamodb.us-west-2.amazonaws.com:443/", nil)
			},
			service: "dynamodb", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if v.Host != "dynamodb.us-west-2.amazonaws.com" {
					t.Errorf("host received %q", v.Host)
				}
			},
		},
		{
			name: "incoming chunked request: body buffered, sent with Content-Length",
			cred: good,
			req: func(t *testing.T) *http.Request {
				return incoming(t, "POST / HTTP/1.1\r\nHost: dynamodb.us-west-2.amazonaws.com\r\nTransfer-Encoding: chunked\r\n"+
					"X-Amz-Target: DynamoDB_20120810.ListTables\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n")
			},
			service: "dynamodb", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if v.BodySHA != sha256Hex([]byte(`{"a":1}`)) || !contains(v.SignedHeaders, "content-length") {
					t.Errorf("body %s (len %d), signed %q", v.BodySHA, v.BodyLen, v.SignedHeaders)
				}
			},
		},
		{
			name: "non-canonical duplicate header keys merged before signing",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "PUT", "https://bucket.s3.us-west-2.amazonaws.com/k", []byte("x"))
				r.Header["x-amz-meta-a"] = []string{"1"}
				r.Header["X-Amz-Meta-A"] = []string{"2"}
				r.Header["X-AMZ-META-A"] = []string{"3", "4"}
				r.Header["x-amz-tagging"] = []string{"k=v"}
				r.Header["X-Empty"] = []string{}
				return r
			},
			service: "s3", region: "us-west-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if got := v.Headers.Values("X-Amz-Meta-A"); len(got) != 4 {
					t.Errorf("X-Amz-Meta-A received %q", got)
				}
				if contains(v.SignedHeaders, "x-empty") {
					t.Errorf("a header with no values was signed")
				}
			},
		},
		{
			name: "hop-by-hop and Trailer headers left in the map are not signed",
			cred: good,
			req: func(t *testing.T) *http.Request {
				r := newBodyReq(t, "GET", "https://sts.us-east-2.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15", nil)
				r.Header["keep-alive"] = []string{"timeout=5"}
				r.Header["Trailer"] = []string{"X-Checksum"}
				return r
			},
			service: "sts", region: "us-east-2",
			check: func(t *testing.T, v sigv4Verdict) {
				if contains(v.SignedHeaders, "keep-alive") || contains(v.SignedHeaders, "trailer") {
					t.Errorf("hop-by-hop header signed: %q", v.SignedHeaders)
				}
			},
		},
		{
			name: "explicit service and inferred region",
			cred: good,
			opts: SigV4Options{Service: "execute-api"},
			req: func(t *testing.T) *http.Request {
				return newBodyReq(t, "GET", "https://dynamodb.us-west-2.amazonaws.com/", nil)
			},
			service: "execute-api", region: "us-west-2",
		},
	}
	for _, tc := range cases {
		for _, proto := range []struct {
			name  string
			c     *http.Client
			major int
		}{{"h1", h1, 1}, {"h2", h2, 2}} {
			t.Run(tc.name+"/"+proto.name, func(t *testing.T) {
				in := mustSigV4(t, tc.opts)
				r := tc.req(t)
				if err := in.Inject(r, tc.cred); err != nil {
					t.Fatalf("Inject: %v", err)
				}
				status, v := sendToVerifier(t, proto.c, r)
				if status != http.StatusOK || !v.Valid {
					t.Fatalf("verifier: %d %s", status, v.Reason)
				}
				if v.Proto != proto.major {
					t.Fatalf("sent over HTTP/%d, want %d", v.Proto, proto.major)
				}
				if v.Service != tc.service || v.Region != tc.region {
					t.Errorf("scope %s/%s, want %s/%s", v.Service, v.Region, tc.service, tc.region)
				}
				if v.AuthCount != 1 {
					t.Errorf("%d Authorization values received", v.AuthCount)
				}
				if tc.cred.Fields[broker.FieldSessionToken].IsZero() && len(v.Token) != 0 {
					t.Errorf("X-Amz-Security-Token %q sent without a session token", v.Token)
				}
				if tc.check != nil {
					tc.check(t, v)
				}
			})
		}
	}

	t.Run("wrong secret is rejected", func(t *testing.T) {
		for _, c := range []*http.Client{h1, h2} {
			r := newBodyReq(t, "GET", "https://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15", nil)
			if err := mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret+"x", "")); err != nil {
				t.Fatal(err)
			}
			status, v := sendToVerifier(t, c, r)
			if status != http.StatusForbidden || v.Valid || !strings.Contains(v.Reason, "signature mismatch") {
				t.Fatalf("wrong secret accepted: %d %+v", status, v.Reason)
			}
		}
	})
	t.Run("tampering after signing is rejected", func(t *testing.T) {
		r := newBodyReq(t, "GET", "https://dynamodb.us-west-2.amazonaws.com/", nil)
		r.Header.Set("X-Amz-Target", "A")
		if err := mustSigV4(t, SigV4Options{}).Inject(r, good); err != nil {
			t.Fatal(err)
		}
		r.Header.Set("X-Amz-Target", "B")
		if status, v := sendToVerifier(t, h1, r); status != http.StatusForbidden || v.Valid {
			t.Fatalf("tampered request accepted: %d", status)
		}
	})
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// The AWS SigV4 test suite's get-vanilla case: the library (and the
// injector around it) agree with AWS's published signature.
func TestSigV4KnownVector(t *testing.T) {
	in := mustSigV4(t, SigV4Options{Service: "service", Region: "us-east-1",
		Clock: sigv4FixedClock{time.Date(2015, 8, 30, 12, 36, 0, 0, time.UTC)}})
	r := newReq(t, "https://example.amazonaws.com/")
	if err := in.Inject(r, awsCred("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "")); err != nil {
		t.Fatal(err)
	}
	const want = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, " +
		"SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
	if got := r.Header.Get("Authorization"); got != want {
		t.Fatalf("Authorization\n got %s\nwant %s", got, want)
	}
	if got := r.Header.Get("X-Amz-Date"); got != "20150830T123600Z" {
		t.Fatalf("X-Amz-Date %q", got)
	}
}

func TestSigV4ReplacesDummySignature(t *testing.T) {
	for _, token := range []string{"", "session-token-value"} {
		t.Run(fmt.Sprintf("token=%v", token != ""), func(t *testing.T) {
			r := newReq(t, "https://sts.us-east-2.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15")
			for _, name := range []string{"Authorization", "X-Amz-Date", "X-Amz-Security-Token"} {
				r.Header[name] = []string{"dummy-1", "dummy-2"}
				for _, v := range caseVariants(name) {
					r.Header[v] = []string{"dummy-" + v}
				}
			}
			if err := mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret, token)); err != nil {
				t.Fatal(err)
			}
			if ks := variantKeys(r.Header, "Authorization"); len(ks) != 1 || ks[0] != "Authorization" || len(r.Header["Authorization"]) != 1 {
				t.Fatalf("Authorization keys %q values %q", ks, r.Header["Authorization"])
			}
			if !strings.HasPrefix(r.Header["Authorization"][0], "AWS4-HMAC-SHA256 Credential="+testAKID+"/20260314/us-east-2/sts/aws4_request, ") {
				t.Fatalf("Authorization %q", r.Header["Authorization"][0])
			}
			if ks := variantKeys(r.Header, "X-Amz-Date"); len(ks) != 1 || len(r.Header[ks[0]]) != 1 || r.Header[ks[0]][0] != "20260314T150926Z" {
				t.Fatalf("X-Amz-Date keys %q: %q", ks, r.Header.Values("X-Amz-Date"))
			}
			ks := variantKeys(r.Header, "X-Amz-Security-Token")
			if token == "" && len(ks) != 0 {
				t.Fatalf("stale X-Amz-Security-Token kept: %q", ks)
			}
			if token != "" && (len(ks) != 1 || !reflect.DeepEqual(r.Header[ks[0]], []string{token})) {
				t.Fatalf("X-Amz-Security-Token keys %q values %q", ks, r.Header.Values("X-Amz-Security-Token"))
			}
			for k, vs := range r.Header {
				for _, v := range vs {
					if strings.HasPrefix(v, "dummy") {
						t.Fatalf("dummy value kept under %q", k)
					}
				}
			}
			lines, _ := wireRoundTrip(t, r.Clone(context.Background()), "Authorization")
			if lines != 1 {
				t.Fatalf("%d Authorization lines on the wire", lines)
			}
			if _, _, err := wireVerify(t, r, map[string]string{testAKID: testSecret}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The library caches derived keys without the secret in the key; the
// injector must not sign with a previous secret for the same access key id.
func TestSigV4SameAccessKeyDifferentSecret(t *testing.T) {
	in := mustSigV4(t, SigV4Options{})
	sign := func(secret string) *http.Request {
		r := newReq(t, "https://dynamodb.us-west-2.amazonaws.com/")
		if err := in.Inject(r, awsCred(testAKID, secret, "")); err != nil {
			t.Fatal(err)
		}
		return r
	}
	a, b := sign("secret-A"), sign("secret-B")
	if a.Header.Get("Authorization") == b.Header.Get("Authorization") {
		t.Fatal("two secrets produced the same signature: a cached key was reused")
	}
	for _, tc := range []struct {
		r      *http.Request
		secret string
		ok     bool
	}{{sign("secret-A"), "secret-A", true}, {sign("secret-B"), "secret-B", true}, {sign("secret-B"), "secret-A", false}, {sign("secret-A"), "secret-B", false}} {
		_, _, err := wireVerify(t, tc.r, map[string]string{testAKID: tc.secret})
		if (err == nil) != tc.ok {
			t.Fatalf("verify with %s: %v (want ok=%v)", tc.secret, err, tc.ok)
		}
	}
}

func TestSigV4Concurrent(t *testing.T) {
	in := mustSigV4(t, SigV4Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Go(func() {
			secret := fmt.Sprintf("secret-%d", i%4)
			r := newReq(t, "https://dynamodb.us-west-2.amazonaws.com/")
			if err := in.Inject(r, awsCred(testAKID, secret, "")); err != nil {
				errs <- err
				return
			}
			if _, _, err := wireVerify(t, r, map[string]string{testAKID: secret}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSigV4DefaultPortAndHost(t *testing.T) {
	secrets := map[string]string{testAKID: testSecret}
	for _, tc := range []struct {
		url, host, wantHost, scope string
	}{
		{"https://sts.amazonaws.com:443/", "", "sts.amazonaws.com", "us-east-1/sts"},
		{"http://sts.amazonaws.com:80/", "", "sts.amazonaws.com", "us-east-1/sts"},
		{"https://sts.amazonaws.com:8443/", "", "sts.amazonaws.com:8443", "us-east-1/sts"},
		{"http://sts.amazonaws.com:443/", "", "sts.amazonaws.com:443", "us-east-1/sts"},
		{"https://sts.amazonaws.com/", "sts.us-east-2.amazonaws.com:443", "sts.us-east-2.amazonaws.com", "us-east-2/sts"},
	} {
		t.Run(tc.url+" "+tc.host, func(t *testing.T) {
			r := newReq(t, tc.url)
			r.Host = tc.host
			if err := mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret, "")); err != nil {
				t.Fatal(err)
			}
			a, recv, err := wireVerify(t, r, secrets)
			if err != nil {
				t.Fatal(err)
			}
			if recv.Host != tc.wantHost || a.Region+"/"+a.Service != tc.scope {
				t.Fatalf("host %q scope %s/%s, want %q %s", recv.Host, a.Region, a.Service, tc.wantHost, tc.scope)
			}
		})
	}
	t.Run("IPv6 literal with explicit scope keeps brackets", func(t *testing.T) {
		r := newReq(t, "https://[::1]:443/")
		if err := mustSigV4(t, SigV4Options{Service: "s3", Region: "us-east-1"}).Inject(r, awsCred(testAKID, testSecret, "")); err != nil {
			t.Fatal(err)
		}
		_, recv, err := wireVerify(t, r, secrets)
		if err != nil || recv.Host != "[::1]" {
			t.Fatalf("host %q: %v", recv.Host, err)
		}
	})
}

// ---- payload modes

type countingBody struct {
	r      io.Reader
	n      int64
	closed bool
	err    error // returned after r is exhausted, instead of io.EOF
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if err == io.EOF && c.err != nil {
		err = c.err
	}
	return n, err
}

func (c *countingBody) Close() error { c.closed = true; return nil }

// infiniteReader yields 'a' forever.
type infiniteReader struct{}

func (infiniteReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'a'
	}
	return len(p), nil
}

func cloneHeader(h http.Header) http.Header {
	if h == nil {
		return nil
	}
	c := make(http.Header, len(h))
	for k, v := range h {
		c[k] = append([]string(nil), v...)
	}
	return c
}

func asBrokerError(t *testing.T, err error, code string) *broker.Error {
	t.Helper()
	var be *broker.Error
	if !errors.As(err, &be) || be.Code != code {
		t.Fatalf("error %v, want *broker.Error code %s", err, code)
	}
	return be
}

func TestSigV4PayloadModes(t *testing.T) {
	secrets := map[string]string{testAKID: testSecret}
	c := awsCred(testAKID, testSecret, "")
	hex64 := sha256Hex([]byte("declared"))

	t.Run("kept hash values: body not read, header kept once", func(t *testing.T) {
		for _, v := range []string{"UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER", hex64} {
			for _, host := range []string{"bucket.s3.us-west-2.amazonaws.com", "dynamodb.us-west-2.amazonaws.com"} {
				t.Run(v+"@"+host, func(t *testing.T) {
					body := &countingBody{r: strings.NewReader("declared")}
					r := newReq(t, "https://"+host+"/k")
					r.Method, r.Body, r.ContentLength = "PUT", body, 8
					r.Header["x-amz-content-sha256"] = []string{v}
					if err := mustSigV4(t, SigV4Options{}).Inject(r, c); err != nil {
						t.Fatal(err)
					}
					if body.n != 0 || r.Body != io.ReadCloser(body) {
						t.Fatalf("body read (%d bytes) or replaced", body.n)
					}
					if ks := variantKeys(r.Header, "X-Amz-Content-Sha256"); len(ks) != 1 || !reflect.DeepEqual(r.Header[ks[0]], []string{v}) {
						t.Fatalf("X-Amz-Content-Sha256 %q %q", ks, r.Header.Values("X-Amz-Content-Sha256"))
					}
					if _, _, err := wireVerify(t, r, secrets); err != nil {
						t.Fatal(err)
					}
				})
			}
		}
	})

	t.Run("absent: body hashed exactly and replayable", func(t *testing.T) {
		for _, tc := range []struct {
			host      string
			body      []byte
			cl        int64
			wantHdr   bool
			chunkedTE bool
		}{
			{"bucket.s3.us-west-2.amazonaws.com", []byte("exact bytes\x00\xff"), 13, true, false},
			{"bucket.s3.us-west-2.amazonaws.com", []byte("unknown length"), -1, true, true},
			{"bucket.s3.us-west-2.amazonaws.com", []byte("cl zero but body"), 0, true, false},
			{"bucket.s3.us-west-2.amazonaws.com", []byte{}, 0, true, false},
			{"dynamodb.us-west-2.amazonaws.com", []byte(`{"x":1}`), 7, false, false},
			{"dynamodb.us-west-2.amazonaws.com", bytes.Repeat([]byte("m"), 1024), -1, false, true},
		} {
			t.Run(fmt.Sprintf("%s/%d/%d", tc.host, len(tc.body), tc.cl), func(t *testing.T) {
				body := &countingBody{r: bytes.NewReader(tc.body)}
				r := newReq(t, "https://"+tc.host+"/k")
				r.Method, r.Body, r.ContentLength = "PUT", body, tc.cl
				if tc.chunkedTE {
					r.TransferEncoding = []string{"chunked"}
				}
				if err := mustSigV4(t, SigV4Options{MaxBody: 1024}).Inject(r, c); err != nil {
					t.Fatal(err)
				}
				want := sha256Hex(tc.body)
				if got := r.Header.Values("X-Amz-Content-Sha256"); tc.wantHdr != (len(got) == 1) || (tc.wantHdr && got[0] != want) {
					t.Fatalf("X-Amz-Content-Sha256 %q, want header=%v %s", got, tc.wantHdr, want)
				}
				if !body.closed || r.ContentLength != int64(len(tc.body)) || r.TransferEncoding != nil {
					t.Fatalf("closed=%v ContentLength=%d TransferEncoding=%q", body.closed, r.ContentLength, r.TransferEncoding)
				}
				for i := range 2 {
					rc, err := r.GetBody()
					if err != nil {
						t.Fatal(err)
					}
					got, _ := io.ReadAll(rc)
					if !bytes.Equal(got, tc.body) {
						t.Fatalf("GetBody #%d = %q", i, got)
					}
				}
				_, recv, err := wireVerify(t, r, secrets)
				if err != nil {
					t.Fatal(err)
				}
				if recv.ContentLength != int64(len(tc.body)) {
					t.Fatalf("sent Content-Length %d", recv.ContentLength)
				}
			})
		}
	})

	t.Run("absent, no body: empty hash", func(t *testing.T) {
		for _, body := range []io.ReadCloser{nil, http.NoBody} {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.Body = body
			if err := mustSigV4(t, SigV4Options{}).Inject(r, c); err != nil {
				t.Fatal(err)
			}
			if got := r.Header.Get("X-Amz-Content-Sha256"); got != emptySHA256 {
				t.Fatalf("got %q", got)
			}
		}
	})

	t.Run("body at the limit is accepted", func(t *testing.T) {
		r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
		r.Method, r.Body, r.ContentLength = "PUT", io.NopCloser(bytes.NewReader(bytes.Repeat([]byte("a"), 100))), -1
		if err := mustSigV4(t, SigV4Options{MaxBody: 100}).Inject(r, c); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("body above the limit: 413, at most MaxBody+1 read, body intact", func(t *testing.T) {
		const maxBody = 100
		for _, tc := range []struct {
			name     string
			cl       int64
			src      io.Reader
			wantRead int64
		}{
			{"unknown length", -1, io.LimitReader(infiniteReader{}, 5000), maxBody + 1},
			{"endless stream", -1, infiniteReader{}, maxBody + 1},
			{"declared length over the limit", 5000, io.LimitReader(infiniteReader{}, 5000), 0},
		} {
			t.Run(tc.name, func(t *testing.T) {
				body := &countingBody{r: tc.src}
				r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
				r.Method, r.Body, r.ContentLength = "PUT", body, tc.cl
				before := cloneHeader(r.Header)
				err := mustSigV4(t, SigV4Options{MaxBody: maxBody}).Inject(r, c)
				be := asBrokerError(t, err, broker.CodePayloadTooLarge)
				if be.Status() != http.StatusRequestEntityTooLarge || !strings.Contains(be.Message, "100 bytes") {
					t.Fatalf("status %d message %q", be.Status(), be.Message)
				}
				if body.n != tc.wantRead {
					t.Fatalf("read %d bytes, want %d", body.n, tc.wantRead)
				}
				if !reflect.DeepEqual(r.Header, before) {
					t.Fatalf("headers changed on error")
				}
				if tc.cl > 0 {
					return
				}
				got, _ := io.ReadAll(io.LimitReader(r.Body, 300))
				if !bytes.Equal(got, bytes.Repeat([]byte("a"), 300)) {
					t.Fatalf("the body no longer yields its bytes: %q", got)
				}
			})
		}
	})

	t.Run("read error is a plain wrapped error", func(t *testing.T) {
		boom := errors.New("connection reset by workload")
		body := &countingBody{r: strings.NewReader("partial"), err: boom}
		r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
		r.Method, r.Body, r.ContentLength = "PUT", body, -1
		before := cloneHeader(r.Header)
		err := mustSigV4(t, SigV4Options{}).Inject(r, c)
		var be *broker.Error
		if !errors.Is(err, boom) || errors.As(err, &be) || !strings.HasPrefix(err.Error(), "inject: ") {
			t.Fatalf("error %v", err)
		}
		if !reflect.DeepEqual(r.Header, before) {
			t.Fatal("headers changed on error")
		}
	})

	t.Run("refused values", func(t *testing.T) {
		for _, tc := range []struct {
			vals    []string
			mention string
		}{
			{[]string{"STREAMING-AWS4-HMAC-SHA256-PAYLOAD"}, "unsigned payload"},
			{[]string{"STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"}, "unsigned payload"},
			{[]string{"STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"}, "unsigned payload"},
			{[]string{"STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"}, "unsigned payload"},
			{[]string{"STREAMING-AWS4-HMAC-SHA256-EVENTS"}, "unsigned payload"},
			{[]string{"unsigned-payload"}, "not a SHA-256"},
			{[]string{strings.ToUpper(hex64)}, "not a SHA-256"},
			{[]string{hex64[:63]}, "not a SHA-256"},
			{[]string{hex64 + "0"}, "not a SHA-256"},
			{[]string{""}, "not a SHA-256"},
			{[]string{"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD"}, "repeated"},
		} {
			t.Run(strings.Join(tc.vals, ","), func(t *testing.T) {
				body := &countingBody{r: strings.NewReader("data")}
				r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
				r.Method, r.Body, r.ContentLength = "PUT", body, 4
				r.Header["X-Amz-Content-Sha256"] = tc.vals[:1]
				if len(tc.vals) > 1 {
					r.Header["x-amz-content-sha256"] = tc.vals[1:]
				}
				r.Header.Set("Authorization", "dummy")
				before := cloneHeader(r.Header)
				be := asBrokerError(t, mustSigV4(t, SigV4Options{}).Inject(r, c), broker.CodeBadRequest)
				if !strings.Contains(be.Message, tc.mention) {
					t.Fatalf("message %q does not mention %q", be.Message, tc.mention)
				}
				if body.n != 0 || !reflect.DeepEqual(r.Header, before) {
					t.Fatalf("request changed on error (read %d)", body.n)
				}
			})
		}
	})
}

func TestSigV4RefusesPresignedURL(t *testing.T) {
	refused := []string{
		"X-Amz-Signature=abc",
		"x-amz-signature=abc",
		"X-AMZ-CREDENTIAL=AKID%2F20260101%2Fus-east-1%2Fs3%2Faws4_request",
		"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z",
		"x-amz-security-token=t",
		"X-Amz-SignedHeaders=host",
		"X%2DAmz%2DSignature=1",
		"%58-amz-signature=1",
		"x-amz-%53ignature=1",
		"a=1&X-Amz-Signature",
		"a=1;X-Amz-Signature=2",
		"prefix=x&X-Amz-Credential=",
	}
	for _, q := range refused {
		t.Run(q, func(t *testing.T) {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k?"+q)
			r.Header.Set("Authorization", "dummy")
			before, rawQuery := cloneHeader(r.Header), r.URL.RawQuery
			be := asBrokerError(t, mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret, "")), broker.CodeDenied)
			if be.Status() != http.StatusForbidden || !strings.Contains(be.Message, "pre-signed") || !strings.Contains(be.Message, "without inject") {
				t.Fatalf("status %d message %q", be.Status(), be.Message)
			}
			if !reflect.DeepEqual(r.Header, before) || r.URL.RawQuery != rawQuery {
				t.Fatal("request changed on error")
			}
		})
	}
	for _, q := range []string{"X-Amz-Signaturex=1", "q=X-Amz-Signature", "X-Amz-Expires=60", "uploads", "X-Amz-Date=x"} {
		t.Run("allowed "+q, func(t *testing.T) {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k?"+q)
			if err := mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret, "")); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestSigV4RefusesUnsignableQuery(t *testing.T) {
	for _, q := range []string{"a=%zz", "a=1;b=2"} {
		r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
		r.URL.RawQuery = q
		be := asBrokerError(t, mustSigV4(t, SigV4Options{}).Inject(r, awsCred(testAKID, testSecret, "")), broker.CodeBadRequest)
		if r.URL.RawQuery != q || !strings.Contains(be.Message, "query") {
			t.Fatalf("%q: %v", q, be)
		}
	}
}

func TestInferSigV4(t *testing.T) {
	for _, tc := range []struct{ host, service, region string }{
		{"s3.amazonaws.com", "s3", "us-east-1"},
		{"bucket.s3.amazonaws.com", "s3", "us-east-1"},
		{"my.dotted.bucket.s3.amazonaws.com", "s3", "us-east-1"},
		{"s3-external-1.amazonaws.com", "s3", "us-east-1"},
		{"s3.us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"bucket.s3.us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"Bucket.S3.US-WEST-2.AmazonAWS.com", "s3", "us-west-2"},
		{"bucket.s3.us-west-2.amazonaws.com:443", "s3", "us-west-2"},
		{"s3-us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"bucket.s3-eu-west-1.amazonaws.com", "s3", "eu-west-1"},
		{"s3.dualstack.ap-southeast-2.amazonaws.com", "s3", "ap-southeast-2"},
		{"bucket.s3.dualstack.ap-southeast-2.amazonaws.com", "s3", "ap-southeast-2"},
		{"s3-fips.us-east-1.amazonaws.com", "s3", "us-east-1"},
		{"bucket.s3-fips.dualstack.us-east-1.amazonaws.com", "s3", "us-east-1"},
		{"ap-123456789012.s3-accesspoint.us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"123456789012.s3-control.us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"s3-control.us-west-2.amazonaws.com", "s3", "us-west-2"},
		{"ol-123456789012.s3-object-lambda.us-west-2.amazonaws.com", "s3-object-lambda", "us-west-2"},
		{"s3.cn-north-1.amazonaws.com.cn", "s3", "cn-north-1"},
		{"dynamodb.us-west-2.amazonaws.com", "dynamodb", "us-west-2"},
		{"sqs.eu-central-1.amazonaws.com", "sqs", "eu-central-1"},
		{"lambda.us-east-1.amazonaws.com", "lambda", "us-east-1"},
		{"kms.ap-northeast-1.amazonaws.com", "kms", "ap-northeast-1"},
		{"sts.us-east-2.amazonaws.com", "sts", "us-east-2"},
		{"organizations.us-east-1.amazonaws.com", "organizations", "us-east-1"},
		{"dynamodb-fips.us-gov-west-1.amazonaws.com", "dynamodb", "us-gov-west-1"},
		{"sts-fips.us-east-2.amazonaws.com", "sts", "us-east-2"},
		{"abc123.execute-api.eu-west-1.amazonaws.com", "execute-api", "eu-west-1"},
		{"a1b2c3-ats.iot.us-east-1.amazonaws.com", "iotdata", "us-east-1"},
		{"data.iot.us-east-1.amazonaws.com", "iotdata", "us-east-1"},
		{"iot.us-east-1.amazonaws.com", "iot", "us-east-1"},
		{"email.us-east-1.amazonaws.com", "ses", "us-east-1"},
		{"monitoring.us-east-1.amazonaws.com", "monitoring", "us-east-1"},
		{"runtime.sagemaker.us-east-1.amazonaws.com", "sagemaker", "us-east-1"},
		{"api.ecr.us-east-1.amazonaws.com", "ecr", "us-east-1"},
		{"streams.dynamodb.us-east-1.amazonaws.com", "dynamodb", "us-east-1"},
		{"bedrock-runtime.us-west-2.amazonaws.com", "bedrock", "us-west-2"},
		{"sts.amazonaws.com", "sts", "us-east-1"},
		{"iam.amazonaws.com", "iam", "us-east-1"},
		{"route53.amazonaws.com", "route53", "us-east-1"},
		{"cloudfront.amazonaws.com", "cloudfront", "us-east-1"},
		{"route53.amazonaws.com.cn", "route53", "cn-northwest-1"},
		{"dynamodb.cn-northwest-1.amazonaws.com.cn", "dynamodb", "cn-northwest-1"},
		{"ec2.us-iso-east-1.amazonaws.com", "ec2", "us-iso-east-1"},
	} {
		t.Run(tc.host, func(t *testing.T) {
			s, r, ok := InferSigV4(tc.host)
			if !ok || s != tc.service || r != tc.region {
				t.Fatalf("InferSigV4(%q) = %q, %q, %v; want %q, %q", tc.host, s, r, ok, tc.service, tc.region)
			}
		})
	}
	for _, host := range []string{
		"", "localhost", "127.0.0.1", "[::1]:9000", "minio:9000", "example.com",
		"amazonaws.com", ".amazonaws.com", "amazonaws.com.cn",
		"s3.amazonaws.com.evil.test", "sts.amazonaws.com.", "evilamazonaws.com", "s3.evil-amazonaws.com",
		"s3.amazonaws.com@evil.test", "s3.us-west-2.amazonaws.com.evil.test",
		"dynamodb.amazonaws.com",                        // not global
		"us-west-2.amazonaws.com",                       // region only
		"a.b.dynamodb.us-west-2.amazonaws.com",          // unknown shape
		"evil.dynamodb.us-west-2.amazonaws.com",         // not a resource-prefixed service
		"bucket.sts.amazonaws.com",                      // only S3 takes a bucket
		"my-lb-123.us-west-2.elb.amazonaws.com",         // customer load balancer
		"ec2-1-2-3-4.compute-1.amazonaws.com",           // customer instance
		"ec2-1-2-3-4.us-west-2.compute.amazonaws.com",   // customer instance
		"db.abc.us-east-1.rds.amazonaws.com",            // customer database
		"vpce-1.s3.us-east-1.vpce.amazonaws.com",        // PrivateLink: configure explicitly
		"s3.cn-north-1.amazonaws.com",                   // cn region outside .com.cn
		"s3.us-west-2.amazonaws.com.cn",                 // non-cn region under .com.cn
		"s3.amazonaws.com.cn",                           // no global S3 in China
		"s3.useast-1.amazonaws.com",                     // not a region
		"s3.us-west.amazonaws.com",                      // not a region
		"s3-fips-us-west-2.amazonaws.com",               // not the dash form
		"dualstack.us-west-2.amazonaws.com",             // no service
		"x.dualstack.us-west-2.amazonaws.com",           // dualstack only for S3
		"s3-accesspoint.us-west-2.amazonaws.com",        // needs an access point name
		"s3-website-us-west-2.amazonaws.com",            // website endpoint, not the API
		"bucket_name.s3.amazonaws.com",                  // '_' is not a label character
		"-bucket.s3.amazonaws.com",                      // bad label
		"a..s3.amazonaws.com",                           // empty label
		"s3.us-west-2.amazonaws.com\x00.evil.test",      // NUL
		"dynamodb.us-west-2.amazonaws.com/path",         // not a host name
		"dyn amodb.us-west-2.amazonaws.com",             // space
		"xn--s3-ula.us-west-2.amazonaws.com:notaport:1", // bad port form
	} {
		t.Run("no "+host, func(t *testing.T) {
			if s, r, ok := InferSigV4(host); ok {
				t.Fatalf("InferSigV4(%q) = %q, %q, true; want no inference", host, s, r)
			}
		})
	}
}

func TestSigV4InferenceFailureIsClear(t *testing.T) {
	for _, tc := range []struct {
		opts SigV4Options
		url  string
		want string
	}{
		{SigV4Options{}, "http://localhost:9000/bucket", "set as: {sigv4: {service: ..., region: ...}}"},
		{SigV4Options{Service: "s3"}, "http://minio.internal:9000/bucket", "set as: {sigv4: {service: s3, region: ...}}"},
	} {
		r := newReq(t, tc.url)
		before := cloneHeader(r.Header)
		err := mustSigV4(t, tc.opts).Inject(r, awsCred(testAKID, testSecret, ""))
		// The workload is told what to configure: a 502 whose message names it.
		var be *broker.Error
		if err == nil || !errors.As(err, &be) || be.Code != broker.CodeCredentialMalformed || !strings.Contains(be.Message, tc.want) {
			t.Fatalf("error %v, want a credential_malformed *broker.Error whose message contains %q", err, tc.want)
		}
		if !reflect.DeepEqual(r.Header, before) {
			t.Fatal("headers changed on error")
		}
	}
	// With both set, any host works (MinIO).
	r := newReq(t, "http://localhost:9000/bucket")
	if err := mustSigV4(t, SigV4Options{Service: "s3", Region: "us-east-1"}).Inject(r, awsCred(testAKID, testSecret, "")); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Header.Get("Authorization"), "/us-east-1/s3/aws4_request") {
		t.Fatalf("Authorization %q", r.Header.Get("Authorization"))
	}
}

func TestSigV4Options(t *testing.T) {
	for _, tc := range []struct {
		o  SigV4Options
		ok bool
	}{
		{SigV4Options{}, true},
		{SigV4Options{Service: "s3"}, true},
		{SigV4Options{Service: "s3", Region: "us-east-1"}, true},
		{SigV4Options{Service: "execute-api", Region: "my-minio-region", MaxBody: 1}, true},
		{SigV4Options{Region: "us-east-1"}, false},
		{SigV4Options{Service: "S3"}, false},
		{SigV4Options{Service: "s3", Region: "us_east_1"}, false},
		{SigV4Options{Service: "s3/x"}, false},
		{SigV4Options{Service: "s3", Region: "us-east-1\n"}, false},
		{SigV4Options{Service: strings.Repeat("a", 65)}, false},
		{SigV4Options{MaxBody: -1}, false},
	} {
		t.Run(fmt.Sprintf("%+v", tc.o), func(t *testing.T) {
			in, err := SigV4(tc.o)
			if tc.ok != (err == nil) {
				t.Fatalf("err %v, want ok=%v", err, tc.ok)
			}
			if err != nil && (!errors.Is(err, ErrBadSigV4Option) || !strings.HasPrefix(err.Error(), "inject: ")) {
				t.Fatalf("error %v", err)
			}
			if err == nil && in.Kind() != KindSigV4 {
				t.Fatalf("Kind %q", in.Kind())
			}
		})
	}
	in, _ := SigV4(SigV4Options{})
	if s := in.(*sigv4); s.maxBody != DefaultSigV4MaxBody || s.clock == nil {
		t.Fatalf("defaults %+v", s)
	}
}

// Every failure path, with a secret and session token carrying a canary:
// no error string names a value, and the request is unchanged.
func TestSigV4ErrorsNeverLeak(t *testing.T) {
	cn := canary(t)
	secret, token := "sec-"+cn, "tok-"+cn
	good := awsCred(testAKID, secret, token)
	for _, tc := range []struct {
		name string
		cred broker.Credential
		opts SigV4Options
		req  func(t *testing.T) *http.Request
	}{
		{"missing access key id", cred(map[string]string{broker.FieldSecretAccessKey: secret, broker.FieldSessionToken: token}), SigV4Options{}, nil},
		{"missing secret", cred(map[string]string{broker.FieldAccessKeyID: testAKID, broker.FieldSessionToken: token}), SigV4Options{}, nil},
		{"empty secret", awsCred(testAKID, "", token), SigV4Options{}, nil},
		{"secret with newline", awsCred(testAKID, secret+"\r\nX: "+cn, token), SigV4Options{}, nil},
		{"token with NUL", awsCred(testAKID, secret, token+"\x00"+cn), SigV4Options{}, nil},
		{"token too long", awsCred(testAKID, secret, strings.Repeat(cn, MaxValueLen/len(cn)+1)), SigV4Options{}, nil},
		{"access key id with control char", awsCred(cn+"\x01", secret, token), SigV4Options{}, nil},
		{"pre-signed URL", good, SigV4Options{}, func(t *testing.T) *http.Request {
			return newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k?X-Amz-Signature=1")
		}},
		{"signed streaming payload", good, SigV4Options{}, func(t *testing.T) *http.Request {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.Header.Set("X-Amz-Content-Sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
			return r
		}},
		{"bad payload hash", good, SigV4Options{}, func(t *testing.T) *http.Request {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.Header.Set("X-Amz-Content-Sha256", "nope")
			return r
		}},
		{"body too large", good, SigV4Options{MaxBody: 1}, func(t *testing.T) *http.Request {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.Body, r.ContentLength = io.NopCloser(strings.NewReader("abc")), -1
			return r
		}},
		{"body read error", good, SigV4Options{}, func(t *testing.T) *http.Request {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.Body, r.ContentLength = &countingBody{r: strings.NewReader("x"), err: errors.New("boom")}, -1
			return r
		}},
		{"host not inferable", good, SigV4Options{}, func(t *testing.T) *http.Request { return newReq(t, "https://localhost/") }},
		{"region not inferable", good, SigV4Options{Service: "s3"}, func(t *testing.T) *http.Request { return newReq(t, "https://localhost/") }},
		{"unsignable query", good, SigV4Options{}, func(t *testing.T) *http.Request {
			return newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k?a=%zz")
		}},
		{"opaque URL", good, SigV4Options{}, func(t *testing.T) *http.Request {
			r := newReq(t, "https://bucket.s3.us-west-2.amazonaws.com/k")
			r.URL.Opaque = "//bucket.s3.us-west-2.amazonaws.com/k"
			return r
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r *http.Request
			if tc.req != nil {
				r = tc.req(t)
			} else {
				r = newReq(t, "https://sts.amazonaws.com/")
			}
			r.Header.Set("Authorization", "dummy")
			r.Header["x-amz-security-token"] = []string{"stale"}
			before, rawQuery, host := cloneHeader(r.Header), r.URL.RawQuery, r.Host
			err := mustSigV4(t, tc.opts).Inject(r, tc.cred)
			if err == nil {
				t.Fatal("Inject succeeded")
			}
			assertNoCanary(t, cn, err)
			var be *broker.Error
			if errors.As(err, &be) {
				assertNoCanary(t, cn, be.Message, be)
			}
			if !reflect.DeepEqual(r.Header, before) || r.URL.RawQuery != rawQuery || r.Host != host {
				t.Fatal("request changed on error")
			}
		})
	}
}

func BenchmarkSigV4Inject(b *testing.B) {
	in := mustSigV4(b, SigV4Options{})
	c := awsCred(testAKID, testSecret, "FwoGZXIvYXdzEXAMPLETOKEN")
	r := newReq(b, "https://dynamodb.us-west-2.amazonaws.com/")
	r.Header.Set("User-Agent", "aws-sdk-go-v2/1.0")
	r.Header.Set("Amz-Sdk-Invocation-Id", "0f7e4c1a-8d7e-4b8a-9c3e-1f2a3b4c5d6e")
	b.ReportAllocs()
	for b.Loop() {
		if err := in.Inject(r, c); err != nil {
			b.Fatal(err)
		}
	}
}
