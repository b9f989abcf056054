package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	s3types "github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/keygate/broker/internal/testservers"
)

// The AWS tests run the real broker binary in front of a real MinIO: its
// STS AssumeRole mints the credentials (the broker's base credentials are
// MinIO's root user, given to the broker alone through the SDK default
// chain's environment variables), and its S3 verifies every SigV4
// signature the broker writes. The workload is the real aws-sdk-go-v2 S3
// client holding dummy keys, with HTTPS_PROXY pointing at the broker.

const awsConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: ci-runner, cidrs: [127.0.0.1/32]}]}
egress:
  allow_cidrs: [127.0.0.1/32]
  connect_ports: [{{index .Ports "minio"}}]
  ca_bundle: "{{.Bundle}}"
credentials:
  minio-sts:
    source: aws_sts
    role_arn: arn:aws:iam::123456789012:role/ci
    endpoint: "https://127.0.0.1:{{index .Ports "minio"}}"
    duration: 15m
    cache: 10m
    session_tags: {runner: 'workload.id'}
    session_policy: |
      {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"],
        "Resource": ["arn:aws:s3:::bucket-a", "arn:aws:s3:::bucket-a/*"]}]}
  sts-down:
    source: aws_sts
    role_arn: arn:aws:iam::123456789012:role/ci
    endpoint: "https://127.0.0.1:{{index .Ports "dead"}}"
    timeout: 3s
    cache: none
rules:
  - name: keep-protected
    hosts: [localhost]
    ports: [{{index .Ports "minio"}}]
    when: 'request.method == "DELETE" && request.path.startsWith("/bucket-a/protected/")'
    action: deny
  - name: sts-outage
    hosts: [localhost]
    ports: [{{index .Ports "minio"}}]
    when: 'request.path.startsWith("/bucket-c")'
    inject: {credential: sts-down, as: {sigv4: {service: s3, region: us-east-1}}}
  - name: ci-s3
    hosts: [localhost]
    ports: [{{index .Ports "minio"}}]
    inject: {credential: minio-sts, as: {sigv4: {service: s3, region: us-east-1}}}
`

type awsWorld struct {
	h      *harness
	m      *testservers.MinIO
	b      *brokerProc
	client *s3.Client // the workload: dummy keys, through the broker
	root   *s3.Client // test setup and inspection: MinIO's root user, direct
}

func newAWSWorld(t *testing.T) *awsWorld {
	t.Helper()
	m := testservers.StartMinIO(t, testservers.MinIOOptions{})
	h := newHarness(t)
	ports := map[string]int{"minio": atoiPort(t, m.Addr), "dead": atoiPort(t, freeAddr(t))}
	// The broker trusts MinIO's test CA for both STS and S3.
	spec := brokerSpec{name: "aws", config: strings.ReplaceAll(awsConfig, "{{.Bundle}}", m.CAFile),
		env: []string{"AWS_ACCESS_KEY_ID=" + m.RootUser, "AWS_SECRET_ACCESS_KEY=" + m.RootPassword}}
	b := h.start(spec, ports)
	w := &awsWorld{h: h, m: m, b: b}
	t.Cleanup(func() { w.scanFor(t, m.RootPassword) })

	w.client = workloadS3(h, b, ports["minio"])
	// bucket-a is created by the workload, through the broker.
	w.root = rootS3(t, m, "bucket-b", "bucket-c")
	return w
}

// rootS3 is an S3 client for setup and inspection: MinIO's root user,
// direct (no broker). It creates buckets first.
func rootS3(t *testing.T, m *testservers.MinIO, buckets ...string) *s3.Client {
	t.Helper()
	c := s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(m.Endpoint),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(m.RootUser, m.RootPassword, ""),
		HTTPClient:   &http.Client{Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: m.CAPool}}},
	})
	for _, bucket := range buckets {
		if _, err := c.CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(bucket)}); err != nil {
			t.Fatalf("setup: create %s: %v", bucket, err)
		}
	}
	return c
}

// workloadS3 is the workload's S3 client: dummy keys, HTTPS_PROXY at the
// broker, trusting only the broker CA, path-style to https://localhost:port.
func workloadS3(h *harness, b *brokerProc, port int) *s3.Client {
	proxy, _ := url.Parse(b.proxyURL())
	return s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String("https://localhost:" + strconv.Itoa(port)),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider("AKIDUMMYWORKLOAD", "dummy-secret-not-a-credential", ""),
		HTTPClient: &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxy),
			TLSClientConfig: &tls.Config{RootCAs: h.caPool()}}},
		RetryMaxAttempts: 1,
	})
}

func atoiPort(t *testing.T, addr string) int {
	t.Helper()
	p, err := strconv.Atoi(portOf(addr))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// scanFor fails the test if secret appears in the broker's output.
func (w *awsWorld) scanFor(t *testing.T, secret string) {
	if bytes.Contains(w.b.output(), []byte(secret)) {
		t.Errorf("the broker output contains a secret (the MinIO root password)")
	}
}

// captureHeader records a header of the request as the SDK sends it.
func captureHeader(st *middleware.Stack, name string, out *string) error {
	return st.Finalize.Add(middleware.FinalizeMiddlewareFunc("keygate-capture-"+name, func(ctx context.Context,
		in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
		if r, ok := in.Request.(*smithyhttp.Request); ok {
			*out = r.Header.Get(name)
		}
		return next.HandleFinalize(ctx, in)
	}), middleware.After)
}

// captureContentSha records whether the SDK signed the request with the
// streaming trailer payload mode (checked after the SDK's own signing).
func captureContentSha(st *middleware.Stack, saw *bool) error {
	return st.Finalize.Add(middleware.FinalizeMiddlewareFunc("keygate-capture", func(ctx context.Context,
		in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
		if r, ok := in.Request.(*smithyhttp.Request); ok && r.Header.Get("X-Amz-Content-Sha256") == "STREAMING-UNSIGNED-PAYLOAD-TRAILER" {
			*saw = true
		}
		return next.HandleFinalize(ctx, in)
	}), middleware.After)
}

// responseOf returns the raw HTTP response behind an SDK error.
func responseOf(err error) *http.Response {
	var re *smithyhttp.ResponseError
	if errors.As(err, &re) && re.Response != nil {
		return re.Response.Response
	}
	return nil
}

func TestAWSS3ThroughBroker(t *testing.T) {
	w := newAWSWorld(t)
	ctx := context.Background()
	small := []byte("hello from a workload that holds no AWS key")
	big := make([]byte, 6<<20+12345)
	if _, err := rand.Read(big); err != nil {
		t.Fatal(err)
	}

	t.Run("CreateBucket", func(t *testing.T) {
		if _, err := w.client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("bucket-a")}); err != nil {
			t.Fatalf("CreateBucket: %v", err)
		}
		if _, err := w.root.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String("bucket-a")}); err != nil {
			t.Fatalf("MinIO has no bucket-a after CreateBucket: %v", err)
		}
	})
	t.Run("PutObject small", func(t *testing.T) {
		if _, err := w.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("small.txt"),
			Body: bytes.NewReader(small)}); err != nil {
			t.Fatalf("PutObject: %v", err)
		}
	})
	t.Run("PutObject streamed multi-megabyte with trailing checksum", func(t *testing.T) {
		// An io.Reader that is not seekable: the SDK streams it as
		// aws-chunked with a trailing checksum (STREAMING-UNSIGNED-PAYLOAD-TRAILER).
		var sawTrailer bool
		_, err := w.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("big.bin"),
			Body: io.MultiReader(bytes.NewReader(big)), ContentLength: aws.Int64(int64(len(big))),
			ChecksumAlgorithm: s3types.ChecksumAlgorithmCrc32},
			s3.WithAPIOptions(func(st *middleware.Stack) error { return captureContentSha(st, &sawTrailer) }))
		if err != nil {
			t.Fatalf("PutObject: %v", err)
		}
		if !sawTrailer {
			t.Fatal("the SDK did not send STREAMING-UNSIGNED-PAYLOAD-TRAILER; the test no longer covers that mode")
		}
	})
	t.Run("multipart upload", func(t *testing.T) {
		key := aws.String("multi.bin")
		up, err := w.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: aws.String("bucket-a"), Key: key})
		if err != nil {
			t.Fatalf("CreateMultipartUpload: %v", err)
		}
		var parts []s3types.CompletedPart
		for i, chunk := range [][]byte{big[:5<<20], big[5<<20:]} {
			n := int32(i + 1)
			out, err := w.client.UploadPart(ctx, &s3.UploadPartInput{Bucket: aws.String("bucket-a"), Key: key,
				UploadId: up.UploadId, PartNumber: aws.Int32(n), Body: bytes.NewReader(chunk)})
			if err != nil {
				t.Fatalf("UploadPart %d: %v", n, err)
			}
			parts = append(parts, s3types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(n)})
		}
		if _, err := w.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{Bucket: aws.String("bucket-a"),
			Key: key, UploadId: up.UploadId, MultipartUpload: &s3types.CompletedMultipartUpload{Parts: parts}}); err != nil {
			t.Fatalf("CompleteMultipartUpload: %v", err)
		}
	})
	t.Run("GetObject returns exactly what was stored", func(t *testing.T) {
		for key, want := range map[string][]byte{"small.txt": small, "big.bin": big, "multi.bin": big} {
			out, err := w.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String(key)})
			if err != nil {
				t.Fatalf("GetObject %s: %v", key, err)
			}
			got, err := io.ReadAll(out.Body)
			out.Body.Close()
			if err != nil || sha256.Sum256(got) != sha256.Sum256(want) {
				t.Fatalf("GetObject %s: %d bytes (err %v), want %d identical bytes", key, len(got), err, len(want))
			}
		}
	})
	t.Run("curl PUT with no AWS headers: the broker hashes the body", func(t *testing.T) {
		// curl knows nothing of AWS: no X-Amz-Content-Sha256, no signature.
		// The broker buffers and hashes the body and signs it.
		file := filepath.Join(t.TempDir(), "curl.txt")
		if err := os.WriteFile(file, small, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("curl", "-sS", "--fail-with-body", "--proxy", w.b.proxyURL(), "--cacert", w.h.caPEM(),
			"-T", file, aws.ToString(w.client.Options().BaseEndpoint)+"/bucket-a/curl.txt").CombinedOutput()
		if err != nil {
			t.Fatalf("curl PUT: %v\n%s", err, out)
		}
		got, err := w.root.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("curl.txt")})
		if err != nil {
			t.Fatalf("the object curl PUT is not in MinIO: %v", err)
		}
		b, _ := io.ReadAll(got.Body)
		got.Body.Close()
		if !bytes.Equal(b, small) {
			t.Fatalf("MinIO stored %q", b)
		}
	})
	t.Run("anonymous SDK client", func(t *testing.T) {
		// An SDK with no credentials signs nothing (it declares
		// UNSIGNED-PAYLOAD, which the broker keeps).
		anon := s3.New(w.client.Options(), func(o *s3.Options) { o.Credentials = aws.AnonymousCredentials{} })
		var sent string
		if _, err := anon.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("anon.txt"),
			Body: bytes.NewReader(small)}, s3.WithAPIOptions(func(st *middleware.Stack) error {
			return captureHeader(st, "X-Amz-Content-Sha256", &sent)
		})); err != nil {
			t.Fatalf("anonymous PutObject: %v", err)
		}
		t.Logf("the anonymous SDK sent X-Amz-Content-Sha256 %q", sent)
		out, err := anon.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("anon.txt")})
		if err != nil {
			t.Fatalf("anonymous GetObject: %v", err)
		}
		got, _ := io.ReadAll(out.Body)
		out.Body.Close()
		if !bytes.Equal(got, small) {
			t.Fatalf("anonymous GetObject returned %q", got)
		}
	})
	t.Run("ListObjectsV2", func(t *testing.T) {
		out, err := w.client.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: aws.String("bucket-a")})
		if err != nil {
			t.Fatalf("ListObjectsV2: %v", err)
		}
		if len(out.Contents) != 5 {
			t.Fatalf("listed %d objects, want 5", len(out.Contents))
		}
	})
	t.Run("DeleteObject", func(t *testing.T) {
		if _, err := w.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("small.txt")}); err != nil {
			t.Fatalf("DeleteObject: %v", err)
		}
		if _, err := w.root.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("small.txt")}); err == nil {
			t.Fatal("the object still exists after a successful DeleteObject")
		}
	})
	t.Run("session policy: MinIO refuses bucket-b", func(t *testing.T) {
		_, err := w.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-b"), Key: aws.String("x"),
			Body: bytes.NewReader(small)})
		resp := responseOf(err)
		if resp == nil || resp.StatusCode != http.StatusForbidden || resp.Header.Get("X-Keygate-Error") != "" ||
			!strings.Contains(err.Error(), "AccessDenied") {
			t.Fatalf("PutObject to bucket-b = %v; want MinIO's own 403 AccessDenied (the policy, not the broker)", err)
		}
		if _, err := w.root.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("bucket-b"), Key: aws.String("x")}); err == nil {
			t.Fatal("bucket-b received the object")
		}
	})

	// The audit line of an S3 request names the role and session, never a key.
	line := w.lastAudit(t, "ci-s3")
	if line["credential.kind"] != "aws_sts" || line["credential.role"] != "arn:aws:iam::123456789012:role/ci" ||
		line["credential.session"] != "ci-runner" || line["credential.policy_sha256"] == "" {
		t.Fatalf("audit line = %v", line)
	}
}

func TestAWSDeniedAndFailuresForwardNothing(t *testing.T) {
	w := newAWSWorld(t)
	ctx := context.Background()
	body := []byte("precious")
	if _, err := w.root.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("bucket-a")}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.root.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("protected/keep"),
		Body: bytes.NewReader(body)}); err != nil {
		t.Fatal(err)
	}

	t.Run("rule denies DELETE: 403 from the broker, object kept", func(t *testing.T) {
		_, err := w.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("protected/keep")})
		resp := responseOf(err)
		if resp == nil || resp.StatusCode != http.StatusForbidden || resp.Header.Get("X-Keygate-Error") != "denied" {
			t.Fatalf("DeleteObject = %v; want the broker's 403 denied", err)
		}
		if _, err := w.root.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("protected/keep")}); err != nil {
			t.Fatalf("the protected object is gone: %v", err)
		}
	})
	t.Run("STS down: 503, nothing reaches S3", func(t *testing.T) {
		start := time.Now()
		_, err := w.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bucket-c"), Key: aws.String("x"),
			Body: bytes.NewReader(body)})
		resp := responseOf(err)
		if resp == nil || resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("X-Keygate-Error") != "credential_unavailable" {
			t.Fatalf("PutObject with STS down = %v; want the broker's 503 credential_unavailable", err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("the failure took %s; the STS timeout is 3s", d)
		}
		if _, err := w.root.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String("bucket-c"), Key: aws.String("x")}); err == nil {
			t.Fatal("the object was stored although STS was down")
		}
		line := w.lastAudit(t, "sts-outage")
		if e, _ := line["error"].(string); !strings.Contains(e, "STS AssumeRole failed") {
			t.Fatalf("audit error = %q, want the STS failure summarised", e)
		}
	})
	t.Run("pre-signed URL refused", func(t *testing.T) {
		presign := s3.NewPresignClient(w.client)
		req, err := presign.PresignGetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bucket-a"), Key: aws.String("protected/keep")})
		if err != nil {
			t.Fatal(err)
		}
		hreq, _ := http.NewRequest(http.MethodGet, req.URL, nil)
		resp, err := w.httpClient().Do(hreq)
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(msg), "pre-signed") {
			t.Fatalf("pre-signed GET = %d %s; want the broker's 403 naming the pre-signed URL", resp.StatusCode, msg)
		}
	})
}

// httpClient is the workload's plain HTTP client through the broker.
func (w *awsWorld) httpClient() *http.Client {
	opts := w.client.Options()
	return opts.HTTPClient.(*http.Client)
}

// lastAudit returns the newest audit line of a rule.
func (w *awsWorld) lastAudit(t *testing.T, rule string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		var last map[string]any
		for _, l := range bytes.Split(w.b.output(), []byte("\n")) {
			var m map[string]any
			if json.Unmarshal(l, &m) == nil && m["msg"] == "decision" && m["rule"] == rule {
				last = m
			}
		}
		if last != nil {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("no audit line for rule %s", rule)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
