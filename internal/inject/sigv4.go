package inject

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"golang.org/x/net/http/httpguts"

	"github.com/keygate/broker/internal/broker"
)

// KindSigV4 is the kind of the AWS Signature Version 4 injector.
const KindSigV4 = "sigv4"

// DefaultSigV4MaxBody is how many body bytes the sigv4 injector buffers to
// hash a body whose hash the client did not give.
const DefaultSigV4MaxBody = 16 << 20

// Payload hash values a client may send in X-Amz-Content-Sha256.
const (
	payloadUnsigned         = "UNSIGNED-PAYLOAD"
	payloadStreamingTrailer = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
	// Every STREAMING-AWS4-* mode chains chunk signatures to the seed
	// signature (HMAC and ECDSA, with or without trailer, and event streams).
	payloadSignedStreamingPrefix = "STREAMING-AWS4-"
	emptySHA256                  = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
)

// MinSigV4Lifetime: the sigv4 injector refuses a credential that expires
// within this long (503 credential_unavailable). The aws_sts cache drops
// entries at the same point and refreshes them earlier (STSRefresh).
const MinSigV4Lifetime = 60 * time.Second

// ErrBadSigV4Option is wrapped by SigV4's errors.
var ErrBadSigV4Option = errors.New("invalid sigv4 option")

// SigV4Options configures the sigv4 injector.
type SigV4Options struct {
	Service string       // empty: inferred from the host
	Region  string       // empty: inferred from the host
	MaxBody int64        // 0: DefaultSigV4MaxBody; <0 invalid
	Clock   broker.Clock // nil: broker.SystemClock{}; the signing time
}

type sigv4 struct {
	service string
	region  string
	maxBody int64
	clock   broker.Clock
}

// SigV4 re-signs AWS requests with AWS Signature Version 4
// (aws-sdk-go-v2 signer/v4) using the credential's access_key_id,
// secret_access_key and optional session_token. Service and region may
// both be empty (inferred from the host per request, see InferSigV4), or
// service alone may be set (the region is inferred), or both set. They
// must be lower-case [a-z0-9-].
func SigV4(o SigV4Options) (broker.Injector, error) {
	if o.Region != "" && o.Service == "" {
		return nil, fmt.Errorf("inject: sigv4 region %q without service: set both, or service alone: %w", o.Region, ErrBadSigV4Option)
	}
	if o.Service != "" && !validSigV4Name(o.Service) {
		return nil, fmt.Errorf("inject: sigv4 service %q: want 1-64 characters of [a-z0-9-]: %w", o.Service, ErrBadSigV4Option)
	}
	if o.Region != "" && !validSigV4Name(o.Region) {
		return nil, fmt.Errorf("inject: sigv4 region %q: want 1-64 characters of [a-z0-9-]: %w", o.Region, ErrBadSigV4Option)
	}
	if o.MaxBody < 0 {
		return nil, fmt.Errorf("inject: sigv4 max_body %d is negative: %w", o.MaxBody, ErrBadSigV4Option)
	}
	if o.MaxBody == 0 {
		o.MaxBody = DefaultSigV4MaxBody
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	return &sigv4{service: o.Service, region: o.Region, maxBody: o.MaxBody, clock: o.Clock}, nil
}

func validSigV4Name(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func (*sigv4) Kind() string { return KindSigV4 }

// sigv4Owned are the headers the injector owns: deleted in every case
// before signing, then set by the signer (X-Amz-Content-Sha256 is restored
// or set by the injector).
var sigv4Owned = []string{"Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-Sha256"}

// presignedKeys in a query mean the request is signed in the URL.
var presignedKeys = []string{"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Algorithm", "X-Amz-Security-Token", "X-Amz-SignedHeaders"}

// s3Family services hash the payload into X-Amz-Content-Sha256 (required)
// and URI-encode the path once, not twice, in the canonical request.
var s3Family = map[string]bool{"s3": true, "s3-object-lambda": true, "s3-outposts": true, "s3express": true}

func (s *sigv4) Inject(r *http.Request, c broker.Credential) error {
	// Validate everything first; nothing is changed until signing.
	if !c.Expires.IsZero() && !s.clock.Now().Before(c.Expires.Add(-MinSigV4Lifetime)) {
		// A request signed now may reach AWS after the session ended, and
		// the caches refresh well before this point: refuse, never send a
		// credential this close to its end (SECURITY-TESTS §4).
		return &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q expires within %s; it is not injected", c.Name, MinSigV4Lifetime)}
	}
	akid, err := field(c, broker.FieldAccessKeyID)
	if err != nil {
		return err
	}
	secret, err := field(c, broker.FieldSecretAccessKey)
	if err != nil {
		return err
	}
	var token string
	if _, ok := c.Field(broker.FieldSessionToken); ok {
		if token, err = field(c, broker.FieldSessionToken); err != nil {
			return err
		}
	}
	if r.URL == nil {
		return fmt.Errorf("inject: credential %q: request has no URL", c.Name)
	}
	if r.URL.Opaque != "" {
		// The signer and the transport read an opaque URL differently.
		return &broker.Error{Code: broker.CodeBadRequest, Message: "request URL is opaque; sigv4 signs only origin-form request targets"}
	}
	if presigned(r.URL.RawQuery) {
		return &broker.Error{Code: broker.CodeDenied, Message: "pre-signed AWS URL: the sigv4 injector does not re-sign query-signed requests; " +
			"use a rule without inject to pass it through untouched"}
	}
	// The signer rebuilds RawQuery from url.ParseQuery, which drops pairs it
	// cannot parse; refuse rather than silently change the request.
	if _, err := url.ParseQuery(r.URL.RawQuery); err != nil {
		return &broker.Error{Code: broker.CodeBadRequest, Message: "query string cannot be signed with sigv4 (invalid percent-encoding or ';' separator)"}
	}

	host := r.Host
	if host == "" {
		host = r.URL.Host
	}
	// The Go transport sends the IDNA (punycode) form; sign that.
	host, err = httpguts.PunycodeHostPort(host)
	if err != nil || host == "" {
		return &broker.Error{Code: broker.CodeBadRequest, Message: "request host cannot be signed with sigv4"}
	}
	host = stripDefaultPort(host, r.URL.Scheme)
	service, region, err := s.scope(host)
	if err != nil {
		return err
	}

	payload, setPayloadHeader, err := payloadMode(r.Header, service)
	if err != nil {
		return err
	}
	var body []byte
	buffered := false
	if payload == "" {
		if body, buffered, err = s.readBody(r); err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		payload = hex.EncodeToString(sum[:])
	}

	// Mutate from here on; nothing below fails (SignHTTP cannot: see below).
	if buffered {
		r.Body, r.ContentLength, r.GetBody = replayBody(body)
		// A chunked incoming request now has a known length: the transport
		// must send (and we sign) Content-Length, not chunked framing.
		r.TransferEncoding = nil
	}
	if r.Method == "" {
		r.Method = http.MethodGet // what the transport sends
	}
	r.Host = host
	if r.Header == nil {
		r.Header = make(http.Header)
	}
	for _, name := range sigv4Owned {
		deleteHeader(r.Header, name)
	}
	canonicalizeHeader(r.Header)
	if setPayloadHeader {
		r.Header["X-Amz-Content-Sha256"] = []string{payload}
	}

	// A fresh signer per request: the library caches derived keys by
	// region/service and checks only the access key id and the day, not
	// the secret, so a shared signer would sign with a stale secret after
	// a rotation that kept the access key id.
	signer := v4.NewSigner(func(o *v4.SignerOptions) {
		o.DisableURIPathEscaping = s3Family[service]
	})
	creds := aws.Credentials{AccessKeyID: akid, SecretAccessKey: secret, SessionToken: token}
	// The signer signs every header in the map except a few; hide the ones
	// the transport does not send as stored (hop-by-hop headers, dropped by
	// HTTP/2, and Trailer, which the transport rebuilds from r.Trailer) so
	// they are not signed, and put them back after.
	var hidden [len(sigv4Unsigned)][]string
	for i, name := range sigv4Unsigned {
		if v, ok := r.Header[name]; ok {
			hidden[i] = v
			delete(r.Header, name)
		}
	}
	// SignHTTP returns an error only from key derivation, which cannot
	// fail; the error is returned anyway.
	err = signer.SignHTTP(r.Context(), creds, r, payload, service, region, s.clock.Now())
	for i, name := range sigv4Unsigned {
		if hidden[i] != nil {
			r.Header[name] = hidden[i]
		}
	}
	if err != nil {
		return fmt.Errorf("inject: credential %q: sigv4 signing failed: %w", c.Name, err)
	}
	return nil
}

// sigv4Unsigned are canonical header names left out of the signature
// because they may not reach the service as stored in the map.
var sigv4Unsigned = [...]string{"Connection", "Proxy-Connection", "Keep-Alive", "Upgrade", "Te", "Trailer"}

// scope returns the credential scope for host (no default port).
func (s *sigv4) scope(host string) (service, region string, err error) {
	if s.service != "" && s.region != "" {
		return s.service, s.region, nil
	}
	hostname := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		hostname = h
	}
	isvc, iregion, ok := InferSigV4(hostname)
	if !ok {
		// A configuration problem, not a secret: the workload is told what
		// the operator must set (the host is the one it asked for).
		msg := fmt.Sprintf("cannot infer the AWS service and region from host %q; set as: {sigv4: {service: ..., region: ...}} in the rule", hostname)
		if s.service != "" {
			msg = fmt.Sprintf("cannot infer the AWS region from host %q; set as: {sigv4: {service: %s, region: ...}} in the rule", hostname, s.service)
		}
		return "", "", &broker.Error{Code: broker.CodeCredentialMalformed, Message: "sigv4: " + msg,
			Err: errors.New("inject: sigv4: " + msg)}
	}
	if s.service != "" {
		return s.service, iregion, nil
	}
	return isvc, iregion, nil
}

// payloadMode reads the client's X-Amz-Content-Sha256. It returns the
// payload hash to sign with ("" when the body must be hashed) and whether
// the header must be (re)set to it.
func payloadMode(h http.Header, service string) (payload string, setHeader bool, err error) {
	var vals []string
	for k, v := range h {
		if strings.EqualFold(k, "X-Amz-Content-Sha256") {
			vals = append(vals, v...)
		}
	}
	switch {
	case len(vals) == 0:
		return "", s3Family[service], nil
	case len(vals) > 1:
		return "", false, &broker.Error{Code: broker.CodeBadRequest, Message: "X-Amz-Content-Sha256 is repeated"}
	}
	v := vals[0]
	switch {
	case v == payloadUnsigned, v == payloadStreamingTrailer, isLowerHex64(v):
		return v, true, nil
	case strings.HasPrefix(v, payloadSignedStreamingPrefix):
		return "", false, &broker.Error{Code: broker.CodeBadRequest, Message: "X-Amz-Content-Sha256 " + v + " uses chunk signatures chained to the " +
			"request signature, which the broker cannot re-sign; configure the client for unsigned payload over TLS (UNSIGNED-PAYLOAD or " +
			"STREAMING-UNSIGNED-PAYLOAD-TRAILER; for aws-sdk-go-v2 S3 this is the default over https)"}
	default:
		return "", false, &broker.Error{Code: broker.CodeBadRequest, Message: "X-Amz-Content-Sha256 is not a SHA-256 hex digest, UNSIGNED-PAYLOAD " +
			"or STREAMING-UNSIGNED-PAYLOAD-TRAILER"}
	}
}

func isLowerHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// readBody buffers the body to hash it. buffered reports whether r's body
// must be replaced by the returned bytes. On error r.Body still yields the
// whole original body (bytes read so far, then the rest).
func (s *sigv4) readBody(r *http.Request) (body []byte, buffered bool, err error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, false, nil
	}
	if r.ContentLength > s.maxBody {
		return nil, false, s.tooLarge()
	}
	// ContentLength 0 with a body is "unknown" on the client side, so the
	// body is read rather than trusted to be empty.
	limit := s.maxBody
	if limit < math.MaxInt64 {
		limit++
	}
	orig := r.Body
	buf, err := readAtMost(orig, limit, r.ContentLength)
	if err != nil || int64(len(buf)) > s.maxBody {
		r.Body = &prefixedBody{Reader: io.MultiReader(bytes.NewReader(buf), orig), Closer: orig}
		if err != nil {
			return nil, false, fmt.Errorf("inject: sigv4: reading the request body to hash it: %w", err)
		}
		return nil, false, s.tooLarge()
	}
	_ = orig.Close() // fully read; the replacement carries the bytes
	return buf, true, nil
}

// readAtMost reads up to limit bytes. A declared length sizes the buffer
// (capped, so a false Content-Length cannot make it allocate up front), so
// a body of exactly that length is read without regrowing.
func readAtMost(r io.Reader, limit, declared int64) ([]byte, error) {
	const maxPrealloc = 1 << 20
	size := int64(512)
	if declared > 0 {
		size = min(declared, maxPrealloc) + 1
	}
	b := make([]byte, 0, min(size, limit))
	lr := io.LimitReader(r, limit)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := lr.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

func (s *sigv4) tooLarge() error {
	return &broker.Error{Code: broker.CodePayloadTooLarge, Message: fmt.Sprintf("request body is larger than the sigv4 limit of %d bytes "+
		"(max_body); send X-Amz-Content-Sha256 (a SHA-256 hex digest or UNSIGNED-PAYLOAD) so the broker need not buffer it", s.maxBody)}
}

type prefixedBody struct {
	io.Reader
	io.Closer
}

func replayBody(b []byte) (io.ReadCloser, int64, func() (io.ReadCloser, error)) {
	if len(b) == 0 {
		return http.NoBody, 0, func() (io.ReadCloser, error) { return http.NoBody, nil }
	}
	return io.NopCloser(bytes.NewReader(b)), int64(len(b)), func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}
}

// presigned reports whether the query carries a query-string signature. Keys
// are compared percent-decoded and case-insensitively, splitting on both
// '&' and ';'.
func presigned(raw string) bool {
	if raw == "" {
		return false
	}
	for seg := range strings.SplitSeq(raw, "&") {
		for sub := range strings.SplitSeq(seg, ";") {
			k, _, _ := strings.Cut(sub, "=")
			if k == "" {
				continue
			}
			if presignedKey(k) {
				return true
			}
			if dk, err := url.QueryUnescape(k); err == nil && presignedKey(dk) {
				return true
			}
			if dk, err := url.PathUnescape(k); err == nil && presignedKey(dk) {
				return true
			}
		}
	}
	return false
}

func presignedKey(k string) bool {
	k = strings.TrimSpace(k)
	for _, p := range presignedKeys {
		if strings.EqualFold(k, p) {
			return true
		}
	}
	return false
}

func deleteHeader(h http.Header, name string) {
	for k := range h {
		if strings.EqualFold(k, name) {
			delete(h, k)
		}
	}
}

// canonicalizeHeader merges every key into its canonical form (values in
// sorted key order) and drops keys without values. The signer lowercases
// and merges keys itself in map order, and the transport writes each key
// as stored; one canonical key per name makes both agree, and a key with
// no values would be signed but never sent.
func canonicalizeHeader(h http.Header) {
	var dirty []string
	for k, v := range h {
		if len(v) == 0 || k != http.CanonicalHeaderKey(k) {
			dirty = append(dirty, k)
		}
	}
	if len(dirty) == 0 {
		return
	}
	seen := make(map[string]bool, len(dirty))
	for _, d := range dirty {
		canon := http.CanonicalHeaderKey(d)
		if seen[canon] {
			continue
		}
		seen[canon] = true
		var keys []string
		for k := range h {
			if http.CanonicalHeaderKey(k) == canon {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		var vals []string
		for _, k := range keys {
			vals = append(vals, h[k]...)
			delete(h, k)
		}
		if len(vals) > 0 {
			h[canon] = vals
		}
	}
}

// stripDefaultPort removes ":443" for https and ":80" for http (the
// signer would do the same, but drops IPv6 brackets doing it).
func stripDefaultPort(host, scheme string) string {
	h, port, err := net.SplitHostPort(host)
	if err != nil {
		return host
	}
	if scheme = strings.ToLower(scheme); (scheme == "https" && port == "443") || (scheme == "http" && port == "80") {
		if strings.IndexByte(h, ':') >= 0 {
			return "[" + h + "]"
		}
		return h
	}
	return host
}

// ---- inference

var sigv4Region = regexp.MustCompile(`^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+$`)

// sigv4Global are endpoints without a region label and their signing
// region, per partition suffix.
var sigv4Global = map[string]map[string]string{
	".amazonaws.com": {
		"s3": "us-east-1", "s3-external-1": "us-east-1",
		"sts": "us-east-1", "iam": "us-east-1", "route53": "us-east-1",
		"cloudfront": "us-east-1", "waf": "us-east-1", "budgets": "us-east-1",
	},
	".amazonaws.com.cn": {
		"route53": "cn-northwest-1",
	},
}

// sigv4SigningName maps endpoint prefixes (the labels before the region)
// whose signing name differs from the prefix.
var sigv4SigningName = map[string]string{
	"email":                 "ses",
	"streams.dynamodb":      "dynamodb",
	"runtime.sagemaker":     "sagemaker",
	"api.sagemaker":         "sagemaker",
	"data.iot":              "iotdata",
	"data-ats.iot":          "iotdata",
	"api.ecr":               "ecr",
	"runtime.lex":           "lex",
	"runtime-v2-lex":        "lex",
	"api.pricing":           "pricing",
	"bedrock-runtime":       "bedrock",
	"bedrock-agent":         "bedrock",
	"bedrock-agent-runtime": "bedrock",
}

// sigv4Resource are services whose regional endpoints carry one leading
// account- or resource-specific label: ID.execute-api.REGION (API
// Gateway), PREFIX-ats.iot.REGION (IoT data plane).
var sigv4Resource = map[string]string{
	"execute-api": "execute-api",
	"iot":         "iotdata",
}

// InferSigV4 derives the SigV4 signing service and region from an AWS
// endpoint host name (a port is ignored). It accepts only host names under
// .amazonaws.com and .amazonaws.com.cn whose every label is [a-z0-9-]
// (case-insensitive) and whose shape is one of:
//
//	[BUCKET.]s3.REGION, [BUCKET.]s3[-fips].dualstack.REGION,
//	[BUCKET.]s3-fips.REGION, NAME.s3-accesspoint[.dualstack].REGION,
//	ACCOUNT.s3-control.REGION                                 → s3
//	NAME.s3-object-lambda.REGION                              → s3-object-lambda
//	[BUCKET.]s3, [BUCKET.]s3-external-1 (no region)           → s3, us-east-1
//	[BUCKET.]s3-REGION (legacy dash form)                     → s3, REGION
//	SERVICE.REGION, SERVICE-fips.REGION                       → SERVICE, REGION
//	PREFIX.REGION for the prefixes of a small table (email → ses,
//	  runtime.sagemaker → sagemaker, data.iot → iotdata, bedrock-runtime →
//	  bedrock, ...)
//	ID.execute-api.REGION → execute-api; ID.iot.REGION → iotdata
//	sts, iam, route53, cloudfront, waf, budgets (global)      → SERVICE, us-east-1
//	route53.amazonaws.com.cn                                  → route53, cn-northwest-1
//
// REGION must match ^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+$, and be a cn-
// region exactly under .amazonaws.com.cn. Anything else (other suffixes,
// IP addresses, customer-named hosts like ELB or EC2 names) is not
// inferred: ok is false.
func InferSigV4(host string) (service, region string, ok bool) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(host)
	var suffix, rest string
	switch {
	case strings.HasSuffix(host, ".amazonaws.com"):
		suffix = ".amazonaws.com"
	case strings.HasSuffix(host, ".amazonaws.com.cn"):
		suffix = ".amazonaws.com.cn"
	default:
		return "", "", false
	}
	rest = strings.TrimSuffix(host, suffix)
	labels := strings.Split(rest, ".")
	for _, l := range labels {
		if !validDNSLabel(l) {
			return "", "", false
		}
	}
	china := suffix == ".amazonaws.com.cn"
	regionOK := func(r string) bool {
		return sigv4Region.MatchString(r) && strings.HasPrefix(r, "cn-") == china
	}

	last := labels[len(labels)-1]
	if !regionOK(last) {
		// No region label: a global endpoint or a legacy S3 dash form.
		if len(labels) > 1 && !isS3Label(last) {
			return "", "", false // only S3 has a bucket before a global name
		}
		if r, ok := sigv4Global[suffix][last]; ok {
			if isS3Label(last) {
				return "s3", r, true
			}
			return serviceOf(last), r, true
		}
		if r, ok := strings.CutPrefix(last, "s3-"); ok && regionOK(r) {
			return "s3", r, true
		}
		return "", "", false
	}
	region = last
	pre := labels[:len(labels)-1]
	if len(pre) == 0 {
		return "", "", false
	}
	// S3 forms: the S3 label is the last before the region, or before
	// "dualstack"; anything before it is a bucket or access point name.
	s3 := pre
	if pre[len(pre)-1] == "dualstack" && len(pre) > 1 {
		s3 = pre[:len(pre)-1]
	}
	switch s3[len(s3)-1] {
	case "s3", "s3-fips":
		return "s3", region, true
	case "s3-accesspoint":
		if len(s3) > 1 {
			return "s3", region, true
		}
		return "", "", false
	}
	if len(s3) != len(pre) {
		return "", "", false // dualstack only for S3
	}
	switch len(pre) {
	case 1:
		switch pre[0] {
		case "s3-control":
			return "s3", region, true
		case "s3-object-lambda", "s3-outposts":
			return pre[0], region, true
		}
		svc := strings.TrimSuffix(pre[0], "-fips")
		if svc == "" || svc == "dualstack" || isS3Label(svc) {
			return "", "", false
		}
		return serviceOf(svc), region, true
	case 2:
		if pre[1] == "s3-control" {
			return "s3", region, true
		}
		if pre[1] == "s3-object-lambda" {
			return "s3-object-lambda", region, true
		}
		if svc, ok := sigv4SigningName[pre[0]+"."+pre[1]]; ok {
			return svc, region, true
		}
		if svc, ok := sigv4Resource[pre[1]]; ok {
			return svc, region, true
		}
	}
	return "", "", false
}

func serviceOf(prefix string) string {
	if svc, ok := sigv4SigningName[prefix]; ok {
		return svc
	}
	return prefix
}

// isS3Label reports labels that only S3 endpoint forms may use; they are
// never taken as a generic SERVICE.
func isS3Label(l string) bool {
	return l == "s3" || strings.HasPrefix(l, "s3-")
}

// validDNSLabel: 1-63 of [a-z0-9-], not starting or ending with '-'.
func validDNSLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}
