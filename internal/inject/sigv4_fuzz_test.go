package inject

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/keygate/broker/internal/broker"
)

func FuzzInferSigV4(f *testing.F) {
	for _, h := range []string{
		"s3.amazonaws.com", "bucket.s3.amazonaws.com", "bucket.s3.us-west-2.amazonaws.com",
		"s3-us-west-2.amazonaws.com", "bucket.s3.dualstack.eu-west-1.amazonaws.com",
		"s3-fips.us-east-1.amazonaws.com", "dynamodb.us-west-2.amazonaws.com",
		"abc.execute-api.eu-west-1.amazonaws.com", "sts.amazonaws.com", "route53.amazonaws.com.cn",
		"dynamodb.cn-north-1.amazonaws.com.cn", "email.us-east-1.amazonaws.com",
		"runtime.sagemaker.us-east-1.amazonaws.com", "x-ats.iot.us-east-1.amazonaws.com",
		"s3.amazonaws.com.evil.test", "localhost", "127.0.0.1:443", "[::1]:443",
		"S3.US-GOV-WEST-1.AMAZONAWS.COM:443", "a..amazonaws.com", "-.s3.amazonaws.com",
	} {
		f.Add(h)
	}
	f.Fuzz(func(t *testing.T, host string) {
		svc, region, ok := InferSigV4(host)
		if !ok {
			if svc != "" || region != "" {
				t.Fatalf("not ok but returned %q %q", svc, region)
			}
			return
		}
		if !validSigV4Name(svc) {
			t.Fatalf("service %q outside [a-z0-9-]", svc)
		}
		if !sigv4Region.MatchString(region) {
			t.Fatalf("region %q is not a region", region)
		}
		name := strings.ToLower(host)
		if i := strings.LastIndexByte(name, ':'); i >= 0 {
			name = name[:i]
		}
		if !strings.HasSuffix(name, ".amazonaws.com") && !strings.HasSuffix(name, ".amazonaws.com.cn") {
			t.Fatalf("inferred %s/%s for %q, not under an AWS suffix", svc, region, host)
		}
		if strings.HasSuffix(name, ".amazonaws.com.cn") != strings.HasPrefix(region, "cn-") {
			t.Fatalf("region %q does not match the partition of %q", region, host)
		}
	})
}

// FuzzSigV4Inject feeds random hosts, paths, queries, headers, payload
// hashes and bodies. It never panics; on success exactly one Authorization
// and no stale X-Amz-Security-Token remain, and when the request is one
// the transport would send, the signature verifies over the bytes a
// server receives; on error the request is unchanged.
func FuzzSigV4Inject(f *testing.F) {
	f.Add("dynamodb.us-west-2.amazonaws.com", "/", "", "X-Amz-Target", "DynamoDB_20120810.ListTables", "", []byte(`{}`), false, true, false)
	f.Add("bucket.s3.us-west-2.amazonaws.com", "/a b/c", "list-type=2&prefix=a+b", "x-amz-meta-x", "  v  w ", "UNSIGNED-PAYLOAD", []byte("body"), true, false, false)
	f.Add("bucket.s3.us-west-2.amazonaws.com:443", "/k", "", "Content-Encoding", "aws-chunked", "STREAMING-UNSIGNED-PAYLOAD-TRAILER", []byte("4\r\nbody\r\n0\r\n\r\n"), true, true, false)
	f.Add("bucket.s3.us-west-2.amazonaws.com", "/k", "", "authorization", "dummy", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", []byte("x"), false, true, false)
	f.Add("bucket.s3.us-west-2.amazonaws.com", "/k", "X-Amz-Signature=1", "X-AMZ-SECURITY-TOKEN", "stale", "", []byte(nil), true, true, false)
	f.Add("localhost:9000", "/bucket/key", "uploads", "x-amz-date", "20200101T000000Z", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", []byte(nil), false, true, true)
	f.Add("sts.amazonaws.com", "/", "a=%zz", "Keep-Alive", "5", "", bytes.Repeat([]byte("z"), 100), false, false, false)
	f.Add("sts.amazonaws.com", "/", "a=1;b=2", "X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD", []byte(nil), true, true, false)
	f.Add("abc.execute-api.eu-west-1.amazonaws.com", "/prod/%41", "q=%2F&q=-", "Trailer", "X", "", []byte("hi"), true, true, false)

	const fuzzAKID, fuzzSecret, fuzzToken = "AKIDFUZZ", "fuzz-secret", "fuzz-session-token"
	secrets := map[string]string{fuzzAKID: fuzzSecret}
	withScope := mustSigV4(f, SigV4Options{Service: "s3", Region: "us-east-1", MaxBody: 64})
	inferred := mustSigV4(f, SigV4Options{MaxBody: 64})

	f.Fuzz(func(t *testing.T, host, path, rawQuery, hName, hValue, payload string, body []byte, withToken, knownLen, explicit bool) {
		tok := ""
		if withToken {
			tok = fuzzToken
		}
		c := awsCred(fuzzAKID, fuzzSecret, tok)
		in := inferred
		if explicit {
			in = withScope
		}
		r := &http.Request{
			Method: "PUT",
			URL:    &url.URL{Scheme: "https", Host: host, Path: path, RawQuery: rawQuery},
			Host:   host,
			Header: http.Header{},
		}
		r.Header[hName] = []string{hValue}
		r.Header["authorization"] = []string{"AWS4-HMAC-SHA256 Credential=DUMMY/x"}
		r.Header["x-amz-security-token"] = []string{"stale-1"}
		r.Header["X-Amz-Security-Token"] = []string{"stale-2", "stale-3"}
		if payload != "" {
			r.Header["x-amz-content-sha256"] = []string{payload}
		}
		if len(body) > 0 {
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = -1
			if knownLen {
				r.ContentLength = int64(len(body))
			}
		}
		before := cloneHeader(r.Header)
		beforeURL, beforeHost := *r.URL, r.Host

		err := in.Inject(r, c)
		if err != nil {
			if !reflect.DeepEqual(r.Header, before) || *r.URL != beforeURL || r.Host != beforeHost {
				var be *broker.Error
				t.Fatalf("request changed on error %v (broker.Error: %v)", err, errors.As(err, &be))
			}
			if r.Body != nil {
				got, _ := io.ReadAll(r.Body)
				if !bytes.Equal(got, body) {
					t.Fatalf("body changed on error: %q, want %q", got, body)
				}
			}
			return
		}
		auth := 0
		for k, v := range r.Header {
			if strings.EqualFold(k, "Authorization") {
				auth += len(v)
				if len(v) != 1 || !strings.HasPrefix(v[0], "AWS4-HMAC-SHA256 Credential="+fuzzAKID+"/") {
					t.Fatalf("Authorization %q: %q", k, v)
				}
			}
			if strings.EqualFold(k, "X-Amz-Security-Token") {
				if !withToken || k != "X-Amz-Security-Token" || !reflect.DeepEqual(v, []string{fuzzToken}) {
					t.Fatalf("X-Amz-Security-Token %q: %q (token=%v)", k, v, withToken)
				}
			}
		}
		if auth != 1 {
			t.Fatalf("%d Authorization values", auth)
		}
		if withToken && r.Header.Get("X-Amz-Security-Token") != fuzzToken {
			t.Fatal("session token not set")
		}

		// Verify over the wire when the transport would send this request.
		if !httpguts.ValidHeaderFieldName(hName) || !httpguts.ValidHeaderFieldValue(hValue) ||
			!httpguts.ValidHostHeader(r.Host) || !strings.HasPrefix(r.URL.EscapedPath(), "/") {
			return
		}
		switch http.CanonicalHeaderKey(hName) {
		case "Host", "Content-Length", "Transfer-Encoding", "Expect", "Connection", "Upgrade", "Trailer":
			return // framing the transport or server interprets, not just carries
		}
		if isLowerHex64(payload) && payload != sha256Hex(body) {
			return // a declared hash that lies fails at the service, by design
		}
		recv, got, err := overTheWire(r)
		if err != nil {
			return // the transport would refuse it too
		}
		if _, err := verifySigV4(recv, got, secrets); err != nil {
			t.Fatalf("signed request does not verify on the wire: %v", err)
		}
	})
}
