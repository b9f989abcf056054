package config

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/dbproxy"
	"github.com/keygate/broker/internal/intercept"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/intercept/egress"
)

var databaseName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// validateDatabases checks the databases: entries (docs/postgres.md).
func (c *Config) validateDatabases() Problems {
	var ps Problems
	names := map[string]int{}
	listens := map[string]string{}
	for _, l := range []struct{ key, addr string }{
		{"listen.proxy", c.Listen.Proxy}, {"listen.proxy_tls", c.Listen.ProxyTLS},
		{"listen.transparent", c.Listen.Transparent}, {"listen.admin", c.Listen.Admin},
	} {
		if l.addr != "" {
			listens[l.addr] = l.key
		}
	}
	for i, db := range c.Databases {
		label := fmt.Sprintf("databases[%d]", i)
		if db.Name != "" {
			label = fmt.Sprintf("database %q", db.Name)
		}
		add := func(msg string, path ...any) {
			ps = append(ps, c.problem(label+": "+msg, append([]any{"databases", i}, path...)...))
		}
		switch {
		case db.Name == "":
			add("name is required (it names the listener in audit lines: db:NAME)")
		case !databaseName.MatchString(db.Name):
			add(fmt.Sprintf("name %q must be 1-63 letters, digits, '_', '.' or '-'", db.Name), "name")
		default:
			if first, dup := names[db.Name]; dup {
				add(fmt.Sprintf("name is used twice (first at entry %d)", first+1), "name")
			} else {
				names[db.Name] = i
			}
		}

		switch path, unix := strings.CutPrefix(db.Listen, "unix:"); {
		case db.Listen == "":
			add("listen is required (host:port, or unix:PATH such as unix:/run/keygate/.s.PGSQL.5432)")
		case unix && path == "":
			add("listen: unix: needs a socket path", "listen")
		case !unix:
			if err := checkListenAddr(db.Listen); err != nil {
				add("listen: "+err.Error(), "listen")
			}
		}
		if db.Listen != "" && !strings.HasSuffix(db.Listen, ":0") { // port 0: a fresh port each
			if other, dup := listens[db.Listen]; dup {
				add(fmt.Sprintf("listen %s is already used by %s", db.Listen, other), "listen")
			} else {
				listens[db.Listen] = label
			}
		}

		if db.Upstream == "" {
			add("upstream is required (host:port of the PostgreSQL server)")
		} else if host, port, err := splitUpstream(db.Upstream); err != nil {
			add("upstream: "+err.Error(), "upstream")
		} else if ip, err := netip.ParseAddr(host); err == nil && port > 0 {
			if msg := c.egressRefuses(ip); msg != "" {
				add("upstream "+db.Upstream+" "+msg, "upstream")
			}
		}

		tls := dbproxy.TLSMode(db.TLS)
		switch tls {
		case "", dbproxy.TLSVerifyFull, dbproxy.TLSRequire, dbproxy.TLSDisable:
		default:
			add(fmt.Sprintf("tls %q is not one of disable, require, verify-full", db.TLS), "tls")
		}
		if tls == dbproxy.TLSDisable || tls == dbproxy.TLSRequire {
			if db.CABundle != "" {
				add("ca_bundle applies only to tls: verify-full (tls: "+db.TLS+" verifies no certificate)", "ca_bundle")
			}
			if db.ServerName != "" {
				add("server_name applies only to tls: verify-full", "server_name")
			}
		}

		cr, ok := c.Credentials[db.Credential]
		switch {
		case db.Credential == "":
			add("credential is required (a credentials: entry with a username and a password)")
		case !ok:
			add(fmt.Sprintf("credential %q is not defined under credentials", db.Credential), "credential")
		case db.RDSIAM != nil:
			if cr.Source != "aws_sts" {
				add(fmt.Sprintf("rds_iam needs an aws_sts credential to sign its tokens; credential %q is %s", db.Credential, cr.Source), "rds_iam")
			}
		default:
			if msg := databaseCredentialFits(cr); msg != "" {
				add(fmt.Sprintf("credential %q %s", db.Credential, msg), "credential")
			}
		}
		if r := db.RDSIAM; r != nil {
			switch {
			case r.User == "":
				add("rds_iam.user is required (the database role the token logs in as: GRANT rds_iam TO it)", "rds_iam")
			case strings.IndexByte(r.User, 0) >= 0:
				add("rds_iam.user holds a NUL byte", "rds_iam", "user")
			}
			switch region := databaseRDSRegion(db, cr); {
			case region == "":
				add(fmt.Sprintf("rds_iam.region is required (credential %q sets no region)", db.Credential), "rds_iam")
			case !awsRegion.MatchString(region):
				if r.Region != "" {
					add(fmt.Sprintf("rds_iam.region %q is not an AWS region like us-east-1", r.Region), "rds_iam", "region")
				}
			}
			if tls != "" && tls != dbproxy.TLSVerifyFull {
				add("rds_iam needs tls: verify-full (RDS takes the token as a cleartext password, which the broker sends only over a verified server)", "tls")
			}
		}
	}
	return ps
}

// databaseRDSRegion is an rds_iam entry's region: its own, else its aws_sts
// credential's, else "".
func databaseRDSRegion(db Database, cr Credential) string {
	if db.RDSIAM.Region != "" {
		return db.RDSIAM.Region
	}
	if cr.Source == "aws_sts" {
		return cr.Region
	}
	return ""
}

// databaseCredentialFits says why a credential cannot log in to a database.
func databaseCredentialFits(cr Credential) string {
	switch cr.Source {
	case "static":
		_, u := cr.Values[broker.FieldUsername]
		_, p := cr.Values[broker.FieldPassword]
		if !u || !p {
			return "is static without values username and password"
		}
	case "vault_kv", "vault_dynamic":
		if len(cr.Fields) == 0 && cr.Field == "" {
			return "" // every key of the secret: username and password (database/creds/ROLE) are checked per session
		}
		_, u := cr.Fields[broker.FieldUsername]
		_, p := cr.Fields[broker.FieldPassword]
		if !u || !p {
			return "maps no username and password (set fields: {username: ..., password: ...}, or neither field nor fields)"
		}
	case "aws_sts":
		return "is aws_sts, which has no username and password: add rds_iam: {user: DBUSER} to log in with RDS IAM tokens it signs"
	}
	return ""
}

// splitUpstream parses host:port with a numeric port.
func splitUpstream(s string) (string, int, error) {
	if strings.HasPrefix(s, "unix:") {
		return "", 0, errors.New("must be host:port (the broker reaches the server over TCP, through the egress guard)")
	}
	host, portStr, err := net.SplitHostPort(s)
	if err != nil || host == "" {
		return "", 0, fmt.Errorf("%q is not host:port", s)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("%q: the port must be a number 1-65535", s)
	}
	return host, port, nil
}

// egressRefuses explains why the egress guard would refuse ip ("" when it
// would not), so a database on a private address is caught by validate
// rather than by the first session.
func (c *Config) egressRefuses(ip netip.Addr) string {
	if c.Egress.DenyPrivate != nil && !*c.Egress.DenyPrivate {
		return ""
	}
	ip = ip.Unmap()
	for _, s := range c.Egress.AllowCIDRs {
		if p, err := netip.ParsePrefix(s); err == nil && p.Contains(ip) {
			return ""
		}
	}
	if cl := egress.Classify(ip); cl != egress.ClassPublic {
		return fmt.Sprintf("is a %s address, which the egress guard refuses: add it to egress.allow_cidrs (for example %s)", cl, netip.PrefixFrom(ip, ip.BitLen()))
	}
	return ""
}

// databaseRoots loads each entry's ca_bundle (nil: the egress roots).
func (c *Config) databaseRoots(egressRoots *x509.CertPool) ([]*x509.CertPool, Problems) {
	var ps Problems
	out := make([]*x509.CertPool, len(c.Databases))
	for i, db := range c.Databases {
		out[i] = egressRoots
		if db.CABundle == "" {
			continue
		}
		pem, err := os.ReadFile(c.resolvePath(db.CABundle))
		if err != nil {
			ps = append(ps, c.problem(fmt.Sprintf("database %q: ca_bundle: %v", db.Name, errors.Unwrap(err)), "databases", i, "ca_bundle"))
			continue
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			ps = append(ps, c.problem(fmt.Sprintf("database %q: ca_bundle %s holds no PEM certificate", db.Name, db.CABundle), "databases", i, "ca_bundle"))
			continue
		}
		out[i] = pool
	}
	return out, ps
}

// listenDatabases opens every entry's listener.
func (c *Config) listenDatabases() ([]net.Listener, error) {
	var lns []net.Listener
	for i, db := range c.Databases {
		ln, err := c.listenOn(db.Listen)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, Problems{c.problem(fmt.Sprintf("database %q: listen: %v", db.Name, err), "databases", i, "listen")}
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// dbDialer is the egress dialer as dbproxy wants it: a refusal of the
// guard is a *broker.Error (egress_denied), so the client is told the
// address is refused by policy rather than unreachable.
type dbDialer struct{ d *egress.Dialer }

func (d dbDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	conn, err := d.d.DialContext(ctx, network, address)
	if err != nil && errors.Is(err, egress.ErrDenied) {
		return nil, &broker.Error{Code: broker.CodeEgressDenied, Message: "the database address is refused by the egress policy", Err: err}
	}
	return conn, err
}

// databaseEnv is what building the database servers needs from Build.
type databaseEnv struct {
	pipe    *broker.Pipeline
	dialer  *egress.Dialer
	leaves  *ca.LeafCache
	roots   []*x509.CertPool
	metrics *intercept.Metrics
	clock   broker.Clock
	log     *zap.Logger
}

// buildDatabases makes one dbproxy.Server per entry.
func (c *Config) buildDatabases(env databaseEnv) ([]*dbproxy.Server, error) {
	fps := broker.NewFingerprinter()
	var out []*dbproxy.Server
	for i, db := range c.Databases {
		o := dbproxy.Options{
			Database: dbproxy.Database{
				Name: db.Name, Upstream: db.Upstream, Credential: db.Credential,
				TLS: dbproxy.TLSMode(db.TLS), RootCAs: env.roots[i], ServerName: db.ServerName,
				AllowOptions: db.AllowOptions, AllowReplication: db.AllowReplication,
			},
			Pipeline:         env.pipe,
			Dialer:           dbDialer{env.dialer},
			Logger:           env.log.Named("db." + db.Name),
			Clock:            env.clock,
			Fingerprints:     fps,
			Metrics:          &dbproxy.Metrics{Requests: env.metrics.Requests, Active: env.metrics.Active},
			HandshakeTimeout: time.Duration(c.Limits.HandshakeTimeout),
			UpstreamTimeout:  time.Duration(c.Limits.UpstreamTimeout),
		}
		if db.RDSIAM != nil {
			o.Database.RDSIAM = &dbproxy.RDSIAM{User: db.RDSIAM.User, Region: databaseRDSRegion(db, c.Credentials[db.Credential])}
		}
		if db.ServerTLS == nil || *db.ServerTLS {
			o.ClientTLS = dbproxy.ClientTLSConfig(env.leaves.Get)
		}
		srv, err := dbproxy.New(o)
		if err != nil {
			return nil, Problems{c.problem(strings.TrimPrefix(err.Error(), "dbproxy: "), "databases", i)}
		}
		out = append(out, srv)
	}
	return out, nil
}
