package inject

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	ststypes "github.com/aws/aws-sdk-go-v2/service/sts/types"
	"github.com/aws/smithy-go"

	"github.com/keygate/broker/internal/broker"
)

// KindAWSSTS is the Credential.Kind of an aws_sts source.
const KindAWSSTS = "aws_sts"

// STS limits (AWS STS API reference).
const (
	MinSTSDuration     = 15 * time.Minute
	MaxSTSDuration     = 12 * time.Hour
	DefaultSTSDuration = 15 * time.Minute
	DefaultSTSRegion   = "us-east-1"
	DefaultSTSTimeout  = 10 * time.Second
	maxSessionName     = 64
	maxSessionTags     = 50
	maxTagKey          = 128
	maxTagValue        = 256
	maxSessionPolicy   = 2048 // packed size is checked by STS; this bounds what we send
)

// Cache hints of an aws_sts source (RefreshHinter): a cached session is
// replaced in the background from STSRefresh before its Expiration and is
// no longer served within STSMargin of it, which is also where the sigv4
// injector refuses it (MinSigV4Lifetime). Sessions last at least 15
// minutes, so both leave most of a session's life usable.
const (
	STSRefresh = 5 * time.Minute
	STSMargin  = MinSigV4Lifetime
)

// CacheHints implements RefreshHinter.
func (*stsSource) CacheHints() (margin, refresh time.Duration) { return STSMargin, STSRefresh }

// Grant parameters an aws_sts source reads. A decorator (WithParams) fills
// them per request from the credential's session_policy and session_tags
// expressions, so they are part of the cache key (T-B7): two requests whose
// policies differ never share a credential.
const (
	ParamSessionPolicy = "aws.session_policy"
	ParamTagPrefix     = "aws.tag."
)

// TokenSource yields the broker's own web identity token (a JWT-SVID or a
// projected service-account token), for AssumeRoleWithWebIdentity.
type TokenSource interface {
	Token(ctx context.Context) (broker.Secret, error)
}

// STSOptions configure NewSTS.
type STSOptions struct {
	RoleARN  string
	Duration time.Duration // 0: DefaultSTSDuration
	// Region is the STS signing region (and the regional endpoint when
	// Endpoint is empty); "" is DefaultSTSRegion.
	Region string
	// Endpoint overrides the STS endpoint (a regional or test endpoint).
	Endpoint   string
	ExternalID string
	// SourceIdentity sets SourceIdentity to the workload identity
	// (AssumeRole only; the role's trust policy must allow
	// sts:SetSourceIdentity).
	SourceIdentity bool
	// WebIdentity, when set, makes the source call
	// AssumeRoleWithWebIdentity with this token instead of AssumeRole with
	// base credentials.
	WebIdentity TokenSource
	// Credentials are the broker's base credentials for AssumeRole; nil
	// means the SDK default chain (environment, shared config, container and
	// instance roles).
	Credentials aws.CredentialsProvider
	// HTTPClient is the broker's own client for STS (no proxy, no
	// redirects); nil means a default one.
	HTTPClient *http.Client
	// Timeout bounds one STS call; 0 means DefaultSTSTimeout.
	Timeout time.Duration
}

type stsAPI interface {
	AssumeRole(ctx context.Context, in *sts.AssumeRoleInput, optFns ...func(*sts.Options)) (*sts.AssumeRoleOutput, error)
	AssumeRoleWithWebIdentity(ctx context.Context, in *sts.AssumeRoleWithWebIdentityInput, optFns ...func(*sts.Options)) (*sts.AssumeRoleWithWebIdentityOutput, error)
}

type stsSource struct {
	name string
	o    STSOptions
	api  stsAPI
}

// NewSTS returns a source that mints temporary AWS credentials with STS for
// each call (no caching of its own; wrap it with NewCache). It does no
// network I/O here, so `broker validate` can build it.
//
// The role session name and (optionally) the source identity are derived
// from the workload identity, sanitised to STS's character set and length.
// Session tags and the inline session policy come from grant parameters
// (ParamTagPrefix, ParamSessionPolicy).
func NewSTS(ctx context.Context, name string, o STSOptions) (broker.Source, error) {
	if err := ValidateRoleARN(o.RoleARN); err != nil {
		return nil, fmt.Errorf("inject: credential %q: %w", name, err)
	}
	if o.Duration == 0 {
		o.Duration = DefaultSTSDuration
	}
	if o.Duration < MinSTSDuration || o.Duration > MaxSTSDuration {
		return nil, fmt.Errorf("inject: credential %q: duration %s is outside STS's range %s-%s", name, o.Duration, MinSTSDuration, MaxSTSDuration)
	}
	if o.Region == "" {
		o.Region = DefaultSTSRegion
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultSTSTimeout
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{Transport: &http.Transport{Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	// One retry at most: the cache's singleflight already collapses
	// concurrent callers, and a failing STS must not be hammered.
	opts := func(so *sts.Options) {
		so.Region = o.Region
		so.HTTPClient = o.HTTPClient
		so.RetryMaxAttempts = 2
		so.Retryer = retry.NewStandard(func(ro *retry.StandardOptions) {
			ro.Retryables = append([]retry.IsErrorRetryable{retry.IsErrorRetryableFunc(certificateErrorsFinal)}, ro.Retryables...)
		})
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
		}
	}
	var api stsAPI
	switch {
	case o.WebIdentity != nil:
		// The web identity call is unsigned: the token is the proof.
		api = sts.New(sts.Options{Credentials: aws.AnonymousCredentials{}}, opts)
	case o.Credentials != nil:
		api = sts.New(sts.Options{Credentials: aws.NewCredentialsCache(o.Credentials)}, opts)
	default:
		// The chain's own providers (instance and container roles, SSO)
		// keep the SDK's client and AWS_CA_BUNDLE; only the STS calls below
		// use the broker's client.
		cfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(o.Region))
		if err != nil {
			return nil, fmt.Errorf("inject: credential %q: loading the AWS default credential chain: %w", name, err)
		}
		api = sts.NewFromConfig(cfg, opts)
	}
	return &stsSource{name: name, o: o, api: api}, nil
}

// ValidateRoleARN checks the shape arn:PARTITION:iam:REGION:ACCOUNT:role/NAME.
// In the AWS partitions (aws, aws-cn, aws-us-gov, aws-iso...) the region is
// empty and the account 12 digits. Other partitions are S3-compatible STS
// servers such as MinIO (arn:minio:iam:REGION::role/ID), whose ARNs have no
// account.
func ValidateRoleARN(arn string) error {
	parts := strings.SplitN(arn, ":", 6)
	if len(parts) != 6 || parts[0] != "arn" || parts[1] == "" || parts[2] != "iam" ||
		!strings.HasPrefix(parts[5], "role/") || len(parts[5]) <= len("role/") {
		return fmt.Errorf("role_arn %q is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)", arn)
	}
	if parts[1] == "aws" || strings.HasPrefix(parts[1], "aws-") {
		if parts[3] != "" || len(parts[4]) != 12 || strings.Trim(parts[4], "0123456789") != "" {
			return fmt.Errorf("role_arn %q: want arn:%s:iam::ACCOUNT:role/NAME with a 12-digit account", arn, parts[1])
		}
	}
	return nil
}

func (s *stsSource) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	session := SessionName(id)
	policy, scoped := g.Params[ParamSessionPolicy]
	if scoped && strings.TrimSpace(policy) == "" {
		// A configured session policy that came out empty must not mint an
		// unscoped session: fail closed.
		return broker.Credential{}, errors.New("inject: aws_sts: the session policy is empty; refusing to mint a session without it")
	}
	if len(policy) > maxSessionPolicy {
		return broker.Credential{}, fmt.Errorf("inject: aws_sts: session policy is %d bytes, more than STS accepts (%d)", len(policy), maxSessionPolicy)
	}
	tags, err := sessionTags(g.Params)
	if err != nil {
		return broker.Credential{}, fmt.Errorf("inject: aws_sts: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()
	dur := aws.Int32(int32(s.o.Duration / time.Second))
	// STS states the expiry on its own clock; a session can never outlive
	// the duration asked for from before the call, so a broker clock that
	// lags STS's does not make the session look longer than it is.
	latest := time.Now().Add(s.o.Duration)
	var out *ststypes.Credentials
	op := "AssumeRole"
	if s.o.WebIdentity != nil {
		op = "AssumeRoleWithWebIdentity"
		if len(tags) > 0 {
			return broker.Credential{}, errors.New("inject: aws_sts: session tags cannot be set with a web identity (they come from the token)")
		}
		tok, err := s.o.WebIdentity.Token(ctx)
		if err != nil {
			return broker.Credential{}, fmt.Errorf("inject: aws_sts: the broker's own web identity token: %w", err)
		}
		in := &sts.AssumeRoleWithWebIdentityInput{RoleArn: aws.String(s.o.RoleARN), RoleSessionName: aws.String(session),
			WebIdentityToken: aws.String(tok.Reveal()), DurationSeconds: dur}
		if policy != "" {
			in.Policy = aws.String(policy)
		}
		res, err := s.api.AssumeRoleWithWebIdentity(ctx, in)
		if err != nil {
			return broker.Credential{}, s.callErr(op, err)
		}
		out = res.Credentials
	} else {
		in := &sts.AssumeRoleInput{RoleArn: aws.String(s.o.RoleARN), RoleSessionName: aws.String(session),
			DurationSeconds: dur, Tags: tags}
		if policy != "" {
			in.Policy = aws.String(policy)
		}
		if s.o.ExternalID != "" {
			in.ExternalId = aws.String(s.o.ExternalID)
		}
		if s.o.SourceIdentity {
			in.SourceIdentity = aws.String(session)
		}
		res, err := s.api.AssumeRole(ctx, in)
		if err != nil {
			return broker.Credential{}, s.callErr(op, err)
		}
		out = res.Credentials
	}
	if out == nil || aws.ToString(out.AccessKeyId) == "" || aws.ToString(out.SecretAccessKey) == "" {
		return broker.Credential{}, fmt.Errorf("inject: aws_sts: STS %s returned no credentials", op)
	}
	c := broker.Credential{
		Name: s.name,
		Kind: KindAWSSTS,
		Fields: map[string]broker.Secret{
			broker.FieldAccessKeyID:     broker.NewSecret(aws.ToString(out.AccessKeyId)),
			broker.FieldSecretAccessKey: broker.NewSecret(aws.ToString(out.SecretAccessKey)),
			broker.FieldSessionToken:    broker.NewSecret(aws.ToString(out.SessionToken)),
		},
		Expires: aws.ToTime(out.Expiration),
		Meta:    map[string]string{"role": s.o.RoleARN, "session": session},
	}
	if c.Expires.After(latest) {
		c.Expires = latest
	}
	if policy != "" {
		sum := sha256.Sum256([]byte(policy))
		c.Meta["policy_sha256"] = hex.EncodeToString(sum[:6])
	}
	return c, nil
}

// callErr summarises an STS failure: the API error code and a bounded,
// single-line message (STS messages name the role or the reason, never a
// credential), and a retry hint for throttling.
func (s *stsSource) callErr(op string, err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		be := &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: STS %s failed: %s", s.name, op, ae.ErrorCode()),
			Err:     fmt.Errorf("inject: sts %s: %s: %s", op, ae.ErrorCode(), oneLine(ae.ErrorMessage(), 200))}
		switch ae.ErrorCode() {
		case "Throttling", "ThrottlingException", "RequestLimitExceeded", "SlowDown":
			be.RetryAfter = time.Second
		}
		return be
	}
	return &broker.Error{Code: broker.CodeCredentialUnavailable,
		Message: fmt.Sprintf("credential %q: STS %s failed", s.name, op),
		Err:     fmt.Errorf("inject: sts %s: %w", op, err)}
}

func oneLine(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}

// SessionName derives RoleSessionName (and SourceIdentity) from the
// identity: the ID without its scheme, characters outside STS's set
// [A-Za-z0-9+=,.@_-] replaced by '-', at most 64 characters. A longer ID
// keeps its first 55 characters and a hash of the whole ID, so two
// identities never collapse into one name. An anonymous or empty ID yields
// "keygate". Replacing characters can map two IDs to one name; the name
// is for attribution in CloudTrail, and the cache key uses the identity
// itself.
func SessionName(id broker.Identity) string {
	raw := id.ID
	if i := strings.Index(raw, "://"); i >= 0 {
		raw = raw[i+3:]
	}
	var b strings.Builder
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("+=,.@_-", c) >= 0 {
			b.WriteByte(c)
		} else {
			b.WriteByte('-')
		}
	}
	name := strings.Trim(b.String(), "-")
	if len(name) < 2 {
		return "keygate"
	}
	if len(name) > maxSessionName {
		sum := sha256.Sum256([]byte(id.ID))
		name = name[:min(len(name), maxSessionName-9)] + "-" + hex.EncodeToString(sum[:4])
	}
	return name
}

// sessionTags builds the STS tags from the grant parameters, in key order.
// Invalid keys or values are an error, not sanitised: tags drive
// attribute-based access, and folding two values into one would merge two
// principals.
func sessionTags(params map[string]string) ([]ststypes.Tag, error) {
	var keys []string
	for k := range params {
		if strings.HasPrefix(k, ParamTagPrefix) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, nil
	}
	if len(keys) > maxSessionTags {
		return nil, fmt.Errorf("%d session tags, more than STS accepts (%d)", len(keys), maxSessionTags)
	}
	slices.Sort(keys)
	tags := make([]ststypes.Tag, 0, len(keys))
	for _, k := range keys {
		key, val := strings.TrimPrefix(k, ParamTagPrefix), params[k]
		if err := checkTag(key, maxTagKey, false); err != nil {
			return nil, fmt.Errorf("session tag key %q: %w", key, err)
		}
		if err := checkTag(val, maxTagValue, true); err != nil {
			// The value is derived from the request or claims; do not echo it.
			return nil, fmt.Errorf("session tag %q: value %w", key, err)
		}
		tags = append(tags, ststypes.Tag{Key: aws.String(key), Value: aws.String(val)})
	}
	return tags, nil
}

// checkTag enforces STS's tag character set [\p{L}\p{Z}\p{N}_.:/=+\-@] and
// length.
func checkTag(s string, max int, emptyOK bool) error {
	if s == "" && !emptyOK {
		return errors.New("is empty")
	}
	if !utf8.ValidString(s) {
		return errors.New("is not valid UTF-8")
	}
	if utf8.RuneCountInString(s) > max {
		return fmt.Errorf("is longer than %d characters", max)
	}
	for _, r := range s {
		if unicode.IsLetter(r) || unicode.In(r, unicode.Z) || unicode.IsNumber(r) || strings.ContainsRune("_.:/=+-@", r) {
			continue
		}
		return errors.New("has a character outside STS's tag set (letters, digits, spaces and _.:/=+-@)")
	}
	return nil
}

// WithParams wraps src so that every call first derives grant parameters
// (an STS session policy, session tags) from the caller and the request.
// Wrap it outside the cache: the derived parameters are then part of the
// cache key. A derive error denies the request (it is a rule problem, not a
// backend outage) and carries no derived value.
func WithParams(src broker.Source, derive func(ctx context.Context, id broker.Identity, t broker.Target) (map[string]string, error)) broker.Source {
	return &withParams{src: src, derive: derive}
}

type withParams struct {
	src    broker.Source
	derive func(ctx context.Context, id broker.Identity, t broker.Target) (map[string]string, error)
}

func (w *withParams) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	extra, err := w.derive(ctx, id, g.Target)
	if err != nil {
		return broker.Credential{}, &broker.Error{Code: broker.CodeDenied,
			Message: fmt.Sprintf("credential %q: its parameters could not be computed for this request", g.Credential), Err: err}
	}
	if len(extra) > 0 {
		p := make(map[string]string, len(g.Params)+len(extra))
		maps.Copy(p, g.Params)
		maps.Copy(p, extra)
		g.Params = p
	}
	return w.src.Credential(ctx, id, g)
}

// certificateErrorsFinal stops the SDK retrying a failed certificate check:
// an untrusted or misnamed STS endpoint does not become trusted a second
// later, and a retry only doubles the time to the 503.
func certificateErrorsFinal(err error) aws.Ternary {
	if broker.IsCertificateError(err) {
		return aws.FalseTernary
	}
	return aws.UnknownTernary
}
