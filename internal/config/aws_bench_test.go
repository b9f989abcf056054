package config

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/keygate/broker/internal/testservers"
)

// BenchmarkS3Get compares, in one run against one real MinIO, a signed S3
// GetObject (1 KiB) made by the same aws-sdk-go-v2 client:
//
//   - direct: the SDK signs with MinIO's root key and connects directly;
//   - broker: the SDK holds dummy keys and goes through an in-process
//     broker, which intercepts TLS, decides, takes the STS credential from
//     its cache and re-signs with SigV4.
//
// The ratio direct/broker is the price of keygate for a cached credential
// (keep-alive on both legs). The first broker request mints the credential
// before the timer starts.
func BenchmarkS3Get(b *testing.B) {
	m := testservers.StartMinIO(b, testservers.MinIOOptions{})
	b.Setenv("AWS_ACCESS_KEY_ID", m.RootUser)
	b.Setenv("AWS_SECRET_ACCESS_KEY", m.RootPassword)
	b.Setenv("AWS_CONFIG_FILE", os.DevNull)
	b.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	ctx := context.Background()

	dir := b.TempDir()
	_, port, _ := splitHostPortTB(b, m.Addr)
	cfg := fmt.Sprintf(`
listen: {proxy: 127.0.0.1:0}
ca: {ephemeral: true, cert_out: ca.pem}
attestors: [{type: cidr, identities: [{id: bench, cidrs: [127.0.0.1/32]}]}]
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [%[1]s], ca_bundle: %[2]q}
credentials:
  minio: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/bench", endpoint: "https://127.0.0.1:%[1]s", cache: 10m}
rules:
  - name: s3
    hosts: [localhost]
    ports: [%[1]s]
    inject: {credential: minio, as: {sigv4: {service: s3, region: us-east-1}}}
`, port, m.CAFile)
	path := filepath.Join(dir, "broker.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	s := start(b, path)

	direct := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: aws.String("https://localhost:" + port), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(m.RootUser, m.RootPassword, ""),
		HTTPClient:  &http.Client{Transport: &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: m.CAPool}}}})
	if _, err := direct.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("bench")}); err != nil {
		b.Fatal(err)
	}
	if _, err := direct.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("bench"), Key: aws.String("obj"),
		Body: bytes.NewReader(make([]byte, 1024))}); err != nil {
		b.Fatal(err)
	}
	viaBroker := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: aws.String("https://localhost:" + port), UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider("dummy", "dummy", ""),
		HTTPClient: &http.Client{Transport: &http.Transport{
			Proxy:           http.ProxyURL(&url.URL{Scheme: "http", Host: s.rt.ProxyAddr.String()}),
			TLSClientConfig: s.client(b).Transport.(*http.Transport).TLSClientConfig}}})

	get := func(b *testing.B, c *s3.Client) {
		out, err := c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("bench"), Key: aws.String("obj")})
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, out.Body)
		out.Body.Close()
		if n != 1024 {
			b.Fatalf("read %d bytes", n)
		}
	}
	get(b, viaBroker) // mint the STS credential outside the timer
	for _, bc := range []struct {
		name string
		c    *s3.Client
	}{{"direct", direct}, {"broker", viaBroker}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				get(b, bc.c)
			}
		})
	}
}

func splitHostPortTB(tb testing.TB, addr string) (string, string, error) {
	tb.Helper()
	u, err := url.Parse("//" + addr)
	if err != nil {
		tb.Fatal(err)
	}
	return u.Hostname(), u.Port(), nil
}
