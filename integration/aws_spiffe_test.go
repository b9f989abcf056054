package integration

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/keygate/broker/internal/testservers"
)

// TestAWSWebIdentityFromSPIRE: the broker holds no AWS key and no token
// file. It asks the real SPIRE agent for its own JWT-SVID (audience
// sts.amazonaws.com), trades it at MinIO's AssumeRoleWithWebIdentity, and
// signs the workload's S3 requests with the session.
//
// MinIO verifies the JWT-SVID through OpenID discovery. SPIRE's own
// oidc-discovery-provider is not built here, so the test serves the same
// two documents from SPIRE's live JWT bundle (spire-server bundle show):
// the keys are SPIRE's, the signature check is MinIO's.
func TestAWSWebIdentityFromSPIRE(t *testing.T) {
	spiffeRequireRoot(t)
	var sp *spire
	issuer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			base := "http://" + r.Host
			_ = json.NewEncoder(w).Encode(map[string]any{"issuer": base, "jwks_uri": base + "/keys",
				"authorization_endpoint": base + "/auth", "response_types_supported": []string{"id_token"},
				"subject_types_supported": []string{"public"}, "id_token_signing_alg_values_supported": []string{"RS256", "ES256"}})
		case "/keys":
			_ = json.NewEncoder(w).Encode(map[string]any{"keys": spireJWTKeys(t, sp)})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(issuer.Close)
	sp = startSPIREWith(t, issuer.URL)
	// The agent serves the broker's (uid 0) identity once it has synced
	// the registration entries.
	sp.poll(t, "the broker's JWT-SVID", func() bool {
		_, err := execOutput(sp.agentBin(), "api", "fetch", "jwt", "-audience", "sts.amazonaws.com", "-socketPath", sp.agentSock)
		return err == nil
	})

	const clientID = "sts.amazonaws.com"
	m := testservers.StartMinIO(t, testservers.MinIOOptions{Env: []string{
		"MINIO_IDENTITY_OPENID_CONFIG_URL=" + issuer.URL + "/.well-known/openid-configuration",
		"MINIO_IDENTITY_OPENID_CLIENT_ID=" + clientID,
		"MINIO_IDENTITY_OPENID_ROLE_POLICY=readwrite",
	}})
	// MinIO names a role-policy provider's role after its client id.
	sum := sha1.Sum([]byte(clientID))
	roleARN := "arn:minio:iam:::role/" + base64.RawURLEncoding.EncodeToString(sum[:])

	h := newHarness(t)
	minioPort := atoiPort(t, m.Addr)
	cfg := `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: ci-runner, cidrs: [127.0.0.1/32]}]}
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [` + strconv.Itoa(minioPort) + `], ca_bundle: "` + m.CAFile + `"}
credentials:
  minio-web:
    source: aws_sts
    role_arn: "` + roleARN + `"
    endpoint: "` + m.Endpoint + `"
    cache: 10m
    web_identity: {jwt_svid: {audience: ` + clientID + `, socket: "unix://` + sp.agentSock + `"}}
rules:
  - name: s3
    hosts: [localhost]
    ports: [` + strconv.Itoa(minioPort) + `]
    inject: {credential: minio-web, as: {sigv4: {service: s3, region: us-east-1}}}
`
	// No AWS variables at all in the broker's environment.
	b := h.start(brokerSpec{name: "aws-spire", config: cfg}, nil)
	if bytes.Contains(b.output(), []byte("AWS_")) {
		t.Fatal("unexpected AWS variables in the broker output")
	}

	client := workloadS3(h, b, minioPort)
	ctx := context.Background()
	if _, err := client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("from-spire")}); err != nil {
		t.Fatalf("CreateBucket through the broker with a JWT-SVID session: %v\nbroker:\n%s", err, b.output())
	}
	if _, err := client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("from-spire"), Key: aws.String("k"),
		Body: strings.NewReader("v")}); err != nil {
		t.Fatalf("PutObject: %v", err)
	}
	var line map[string]any
	for _, l := range bytes.Split(b.output(), []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(l, &m) == nil && m["msg"] == "decision" && m["rule"] == "s3" {
			line = m
		}
	}
	if line == nil || line["credential.kind"] != "aws_sts" || line["credential.role"] != roleARN || line["status"] != float64(200) {
		t.Fatalf("audit line = %v", line)
	}
}

// spireJWTKeys returns the JWT signing keys of SPIRE's current bundle as
// JWKS entries.
func spireJWTKeys(t *testing.T, sp *spire) []map[string]any {
	if sp == nil {
		return nil
	}
	out, err := execOutput(sp.serverBin(), "bundle", "show", "-format", "spiffe", "-socketPath", sp.serverSock)
	if err != nil {
		t.Errorf("spire-server bundle show: %v", err)
		return nil
	}
	var bundle struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(out, &bundle); err != nil {
		t.Errorf("spire bundle: %v", err)
		return nil
	}
	var keys []map[string]any
	for _, k := range bundle.Keys {
		if k["use"] == "jwt-svid" {
			k["use"] = "sig"
			keys = append(keys, k)
		}
	}
	return keys
}

func execOutput(bin string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	return exec.CommandContext(ctx, bin, args...).Output()
}
