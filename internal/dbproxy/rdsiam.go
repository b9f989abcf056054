package dbproxy

import (
	"context"
	"errors"
	"net"
	"strconv"

	"github.com/aws/aws-sdk-go-v2/aws"
	rdsauth "github.com/aws/aws-sdk-go-v2/feature/rds/auth"

	"github.com/keygate/broker/internal/broker"
)

// RDSIAM logs in to Amazon RDS / Aurora with an IAM authentication token
// instead of a password (docs/postgres.md, "RDS IAM authentication"). The
// database's credential is then an aws_sts one: its keys sign a token, per
// session, for User, and the token is sent as a cleartext password, which
// the broker does only over verify-full TLS.
type RDSIAM struct {
	// User is the database role (GRANT rds_iam TO User); an aws_sts
	// credential has no username of its own.
	User string
	// Region is the database's AWS region, the token's signing region.
	Region string
}

// rdsTokenEndpoint is the host:port the token is signed for: the name RDS
// knows itself by. That is server_name when set (the upstream may be an
// address or a tunnel), else the upstream host; the port is the upstream's.
func rdsTokenEndpoint(db Database) string {
	host, port, _ := net.SplitHostPort(db.Upstream)
	if db.ServerName != "" {
		host = db.ServerName
	}
	return net.JoinHostPort(host, port)
}

// rdsAuthToken mints an RDS IAM authentication token (a SigV4 presigned
// URL for rds-db:connect, valid 15 minutes) from an aws_sts credential. The
// token is a Secret: it logs in as user until it expires.
func rdsAuthToken(ctx context.Context, endpoint, region, user string, c broker.Credential) (broker.Secret, error) {
	akid, ok1 := c.Field(broker.FieldAccessKeyID)
	secret, ok2 := c.Field(broker.FieldSecretAccessKey)
	if !ok1 || !ok2 {
		return broker.Secret{}, errors.New("the credential has no access_key_id and secret_access_key (an aws_sts credential signs RDS IAM tokens)")
	}
	session, _ := c.Field(broker.FieldSessionToken)
	creds := aws.Credentials{
		AccessKeyID:     akid.Reveal(),
		SecretAccessKey: secret.Reveal(),
		SessionToken:    session.Reveal(),
		Source:          "keygate " + c.Kind,
		CanExpire:       !c.Expires.IsZero(),
		Expires:         c.Expires,
	}
	provider := aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) { return creds, nil })
	tok, err := rdsauth.BuildAuthToken(ctx, endpoint, region, user, provider)
	if err != nil {
		// The SDK's errors name the endpoint, never the keys.
		return broker.Secret{}, errors.New("building the RDS IAM token: " + err.Error())
	}
	return broker.NewSecret(tok), nil
}

// checkRDSIAM is New's check of an RDSIAM entry.
func checkRDSIAM(db Database) error {
	r := db.RDSIAM
	switch {
	case r.User == "":
		return errors.New("dbproxy: database " + db.Name + ": rds_iam needs the database user")
	case r.Region == "":
		return errors.New("dbproxy: database " + db.Name + ": rds_iam needs a region")
	case db.TLS != TLSVerifyFull:
		// RDS asks for the token as a cleartext password, which the broker
		// sends only over verify-full TLS.
		return errors.New("dbproxy: database " + db.Name + ": rds_iam needs tls verify-full, not " + strconv.Quote(string(db.TLS)))
	}
	for i := 0; i < len(r.User); i++ {
		if r.User[i] == 0 {
			return errors.New("dbproxy: database " + db.Name + ": rds_iam user holds a NUL byte")
		}
	}
	return nil
}
