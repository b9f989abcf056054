package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// File names written by Init inside its directory.
const (
	CertFile = "ca.pem"
	KeyFile  = "ca-key.pem"
)

// CommonName is the subject CN of every CA keygate creates.
const CommonName = "keygate MITM CA"

const (
	initValidity      = 10 * 365 * 24 * time.Hour // see doc.go
	ephemeralValidity = 365 * 24 * time.Hour
	caBackdate        = time.Hour
	maxKeyFileSize    = 1 << 20
)

// goproxyCASPKISHA256 is the SHA-256 of the SubjectPublicKeyInfo of
// goproxy's built-in CA (ca.pem of github.com/elazarl/goproxy v1.9.2, equal
// to goproxy.CA_CERT), computed with
//
//	openssl x509 -in ca.pem -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum
const goproxyCASPKISHA256 = "c012de113a81789eb5c392c0580156bbc281f9f93e07f08cafa3329672e6993b"

// goproxyCACommonName is the subject CN of goproxy's built-in CA in every
// release, used to also catch CAs of older goproxy versions.
const goproxyCACommonName = "goproxy.github.io"

// CA is a certificate authority that signs MITM leaves. It is immutable and
// safe for concurrent use.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
	// chain is appended after the leaf in every served chain: the CA itself
	// when it is an intermediate, then any further certificates from the
	// certificate file. Empty for a self-signed root.
	chain [][]byte
}

// CertPEM returns the PEM of the CA certificate, the one clients trust.
func (c *CA) CertPEM() []byte { return bytes.Clone(c.certPEM) }

// Certificate returns the parsed CA certificate. Callers must not modify it.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// Init creates a new ECDSA P-256 CA in dir (created 0700 if missing):
// dir/ca.pem (0644) and dir/ca-key.pem (0600). permit, when non-empty, adds
// critical name constraints that permit only those DNS domains (and their
// subdomains; a leading dot permits subdomains only) and no IP address. It
// never overwrites an existing file.
func Init(dir string, permit []string, clock broker.Clock) error {
	if clock == nil {
		clock = broker.SystemClock{}
	}
	if dir == "" {
		return errors.New("ca: empty directory")
	}
	domains, err := normalizePermit(permit)
	if err != nil {
		return err
	}
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("ca: %s already exists; refusing to overwrite it", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ca: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ca: create directory: %w", err)
	}
	c, err := newCA(clock.Now(), initValidity, domains)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.key)
	if err != nil {
		return fmt.Errorf("ca: encode key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	// The key first: a failure leaves no certificate pointing at a missing key.
	if err := writeExclusive(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeExclusive(certPath, c.certPEM, 0o644); err != nil {
		os.Remove(keyPath)
		return err
	}
	return nil
}

// Ephemeral creates an in-memory ECDSA P-256 CA. When certOut is non-empty
// the CA certificate (never the key) is written there with mode 0644,
// atomically replacing any previous file.
func Ephemeral(certOut string, clock broker.Clock) (*CA, error) {
	if clock == nil {
		clock = broker.SystemClock{}
	}
	c, err := newCA(clock.Now(), ephemeralValidity, nil)
	if err != nil {
		return nil, err
	}
	if certOut != "" {
		if err := writeAtomic(certOut, c.certPEM, 0o644); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Load reads a CA certificate and its private key, refusing anything unsafe
// (see the package documentation).
func Load(certFile, keyFile string) (*CA, error) {
	return load(certFile, keyFile, broker.SystemClock{}.Now())
}

func load(certFile, keyFile string, now time.Time) (*CA, error) {
	raw, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("ca: read certificate: %w", err)
	}
	certs, err := parseCertsPEM(raw)
	if err != nil {
		return nil, fmt.Errorf("ca: certificate file %s: %w", certFile, err)
	}
	cert := certs[0]
	if isGoproxyBuiltin(cert) {
		return nil, fmt.Errorf("ca: certificate file %s holds goproxy's built-in CA, whose private key is public; create a private CA with `broker ca init`", certFile)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("ca: certificate file %s: not a CA certificate (basic constraints CA:TRUE missing)", certFile)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: certificate file %s: key usage does not allow certificate signing", certFile)
	}
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil, fmt.Errorf("ca: certificate file %s: not valid now (valid from %s to %s)",
			certFile, cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339))
	}
	if err := checkKeyType(cert.PublicKey); err != nil {
		return nil, fmt.Errorf("ca: certificate file %s: %w", certFile, err)
	}

	keyPEM, err := readPrivateFile(keyFile)
	if err != nil {
		return nil, err
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: key file %s: %w", keyFile, err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("ca: key file %s does not match certificate file %s", keyFile, certFile)
	}

	c := &CA{
		cert:    cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		key:     key,
	}
	if !bytes.Equal(cert.RawIssuer, cert.RawSubject) || cert.CheckSignatureFrom(cert) != nil {
		c.chain = append(c.chain, cert.Raw) // an intermediate: clients need it
	}
	for _, extra := range certs[1:] {
		c.chain = append(c.chain, extra.Raw)
	}
	return c, nil
}

func isGoproxyBuiltin(cert *x509.Certificate) bool {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:]) == goproxyCASPKISHA256 ||
		cert.Subject.CommonName == goproxyCACommonName ||
		cert.Issuer.CommonName == goproxyCACommonName
}

func checkKeyType(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return nil
		}
		return errors.New("unsupported ECDSA curve")
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key of %d bits is too small (minimum 2048)", k.N.BitLen())
		}
		return nil
	}
	return fmt.Errorf("unsupported public key type %T (want ECDSA or RSA)", pub)
}

// readPrivateFile reads a key file after checking, on the opened
// descriptor, that it is a regular file owned by us with no group or other
// permission bits.
func readPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("ca: read key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("ca: read key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("ca: key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("ca: key file %s has mode %04o; it must not be accessible by group or others (chmod 600)", path, perm)
	}
	if uid, ok := fileOwner(fi); ok && uid != os.Geteuid() {
		return nil, fmt.Errorf("ca: key file %s is owned by uid %d, not by the broker's uid %d", path, uid, os.Geteuid())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("ca: read key: %w", err)
	}
	if len(b) > maxKeyFileSize {
		return nil, fmt.Errorf("ca: key file %s is too large", path)
	}
	return b, nil
}

func parseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return certs, nil
}

// parseKeyPEM returns the first private key in b. Parser errors from
// crypto/x509 are generic and never quote key bytes.
func parseKeyPEM(b []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, errors.New("no PEM private key block")
		}
		if block.Type == "ENCRYPTED PRIVATE KEY" || strings.Contains(block.Headers["Proc-Type"], "ENCRYPTED") {
			return nil, errors.New("encrypted private keys are not supported")
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, err
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
		if err := checkKeyType(s.Public()); err != nil {
			return nil, err
		}
		return s, nil
	}
}

func newCA(now time.Time, validity time.Duration, permit []string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: CommonName, Organization: []string{"keygate"}},
		NotBefore:             now.Add(-caBackdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	if len(permit) > 0 {
		tmpl.PermittedDNSDomainsCritical = true
		tmpl.PermittedDNSDomains = permit
		tmpl.ExcludedIPRanges = []*net.IPNet{
			{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
			{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)},
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("ca: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parse certificate: %w", err)
	}
	return &CA{
		cert:    cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key:     key,
	}, nil
}

// randomSerial returns a positive random 128-bit serial number.
func randomSerial() (*big.Int, error) {
	var b [16]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return nil, fmt.Errorf("ca: serial: %w", err)
		}
		if n := new(big.Int).SetBytes(b[:]); n.Sign() > 0 {
			return n, nil
		}
	}
}

// normalizePermit lower-cases the permitted domains, drops a trailing dot
// and rejects anything that is not a DNS domain.
func normalizePermit(permit []string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, p := range permit {
		d := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(p), "."))
		name := strings.TrimPrefix(d, ".")
		if _, err := netip.ParsePrefix(name); err == nil || isIP(name) {
			return nil, fmt.Errorf("ca: permit %q: IP addresses cannot be permitted; constraints are DNS-only and exclude every IP", p)
		}
		if err := validDNSName(name); err != nil {
			return nil, fmt.Errorf("ca: permit %q: %w", p, err)
		}
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out, nil
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// validDNSName accepts lower-case LDH names (underscores allowed), at most
// 253 characters, 63 per label, whose last label is not all digits.
func validDNSName(s string) error {
	if s == "" {
		return errors.New("empty name")
	}
	if len(s) > 253 {
		return errors.New("name longer than 253 characters")
	}
	start := 0
	for start <= len(s) {
		end := strings.IndexByte(s[start:], '.')
		if end < 0 {
			end = len(s)
		} else {
			end += start
		}
		label := s[start:end]
		if label == "" || len(label) > 63 {
			return errors.New("empty or over-long label")
		}
		digits := true
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("invalid character %q", c)
			}
			digits = digits && c >= '0' && c <= '9'
		}
		if end == len(s) && digits {
			return errors.New("numeric top-level label")
		}
		start = end + 1
	}
	return nil
}

// writeExclusive creates path with mode, failing if it exists.
func writeExclusive(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("ca: %s already exists; refusing to overwrite it", path)
	}
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	err = f.Chmod(mode) // exact mode regardless of umask
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("ca: write %s: %w", path, err)
	}
	return nil
}

// writeAtomic replaces path with data via a temporary file and rename.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("ca: write %s: %w", path, err)
	}
	tmp := f.Name()
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("ca: write %s: %w", path, err)
	}
	return nil
}
