package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Now().Truncate(time.Second)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// initCA runs Init into a fresh directory and returns the paths.
func initCA(t *testing.T, permit []string, clock *fakeClock) (dir, certPath, keyPath string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "ca")
	if err := Init(dir, permit, clock); err != nil {
		t.Fatalf("Init: %v", err)
	}
	return dir, filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
}

func mustLoad(t *testing.T, certPath, keyPath string) *CA {
	t.Helper()
	c, err := Load(certPath, keyPath)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return c
}

func TestInitWritesCA(t *testing.T) {
	clock := newFakeClock()
	dir, certPath, keyPath := initCA(t, nil, clock)

	for _, tc := range []struct {
		path string
		mode os.FileMode
	}{{dir, 0o700}, {certPath, 0o644}, {keyPath, 0o600}} {
		fi, err := os.Stat(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != tc.mode {
			t.Errorf("%s mode %04o, want %04o", tc.path, got, tc.mode)
		}
	}

	c := mustLoad(t, certPath, keyPath)
	cert := c.Certificate()
	if cert.Subject.CommonName != CommonName || !cert.IsCA || !cert.BasicConstraintsValid || !cert.MaxPathLenZero || cert.MaxPathLen != 0 {
		t.Errorf("CA basics wrong: CN=%q IsCA=%v MaxPathLenZero=%v", cert.Subject.CommonName, cert.IsCA, cert.MaxPathLenZero)
	}
	if cert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("KeyUsage = %v", cert.KeyUsage)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is %T, want ECDSA P-256", cert.PublicKey)
	}
	if got := cert.NotAfter.Sub(clock.Now()); got != initValidity {
		t.Errorf("validity %v, want %v", got, initValidity)
	}
	if !cert.NotBefore.Before(clock.Now()) {
		t.Errorf("NotBefore %v not backdated", cert.NotBefore)
	}
	if len(cert.PermittedDNSDomains) != 0 || hasNameConstraints(cert) {
		t.Error("unconstrained CA must carry no name constraints")
	}
	if !bytes.Equal(c.CertPEM(), mustRead(t, certPath)) {
		t.Error("CertPEM differs from ca.pem")
	}
	if block, _ := pem.Decode(mustRead(t, keyPath)); block == nil || block.Type != "PRIVATE KEY" {
		t.Error("ca-key.pem is not a PKCS#8 PEM")
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hasNameConstraints(cert *x509.Certificate) bool {
	for _, e := range cert.Extensions {
		if e.Id.String() == "2.5.29.30" {
			return true
		}
	}
	return false
}

func TestInitRefusesOverwrite(t *testing.T) {
	t.Run("both exist", func(t *testing.T) {
		dir, certPath, keyPath := initCA(t, nil, newFakeClock())
		before := mustRead(t, keyPath)
		err := Init(dir, nil, nil)
		if err == nil || !strings.Contains(err.Error(), certPath) || !strings.HasPrefix(err.Error(), "ca: ") {
			t.Fatalf("err = %v, want a ca: error naming %s", err, certPath)
		}
		if !bytes.Equal(before, mustRead(t, keyPath)) {
			t.Fatal("key was overwritten")
		}
	})
	t.Run("key exists", func(t *testing.T) {
		dir := t.TempDir()
		keyPath := filepath.Join(dir, KeyFile)
		if err := os.WriteFile(keyPath, []byte("precious"), 0o600); err != nil {
			t.Fatal(err)
		}
		err := Init(dir, nil, nil)
		if err == nil || !strings.Contains(err.Error(), keyPath) {
			t.Fatalf("err = %v, want an error naming %s", err, keyPath)
		}
		if _, err := os.Stat(filepath.Join(dir, CertFile)); !errors.Is(err, os.ErrNotExist) {
			t.Fatal("ca.pem written although Init failed")
		}
		if string(mustRead(t, keyPath)) != "precious" {
			t.Fatal("existing key overwritten")
		}
	})
	t.Run("cert is a dangling symlink", func(t *testing.T) {
		dir := t.TempDir()
		target := filepath.Join(dir, "elsewhere")
		if err := os.Symlink(target, filepath.Join(dir, CertFile)); err != nil {
			testservers.Missing(t, "symlink: %v", err)
		}
		if err := Init(dir, nil, nil); err == nil {
			t.Fatal("Init followed a symlink")
		}
		if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
			t.Fatal("Init wrote through a symlink")
		}
	})
}

func TestInitRejectsBadPermit(t *testing.T) {
	for _, p := range []string{"", "*.example.com", "10.0.0.0/8", "192.0.2.1", "::1", "exa mple.com", "example.123", "a..b"} {
		t.Run(p, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ca")
			err := Init(dir, []string{"ok.example", p}, nil)
			if err == nil || !strings.HasPrefix(err.Error(), "ca: permit ") {
				t.Fatalf("err = %v, want a ca: permit error", err)
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Fatal("files written although the permit list is invalid")
			}
		})
	}
}

// T-C2: the CA key must be private to the broker's uid.
func TestCAKeyFilePerms(t *testing.T) {
	_, certPath, keyPath := initCA(t, nil, newFakeClock())
	for _, tc := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o600, true}, {0o400, true}, {0o700, true},
		{0o644, false}, {0o640, false}, {0o604, false}, {0o660, false}, {0o606, false}, {0o666, false},
	} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			if err := os.Chmod(keyPath, tc.mode); err != nil {
				t.Fatal(err)
			}
			_, err := Load(certPath, keyPath)
			if tc.ok && err != nil {
				t.Fatalf("Load with %04o: %v", tc.mode, err)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), keyPath) || !strings.Contains(err.Error(), "mode")) {
				t.Fatalf("Load with %04o = %v, want a refusal naming the key file and its mode", tc.mode, err)
			}
		})
	}
	if err := os.Chmod(keyPath, 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("owner", func(t *testing.T) {
		if os.Geteuid() != 0 {
			testservers.Missing(t, "changing a file's owner needs root")
		}
		if err := os.Chown(keyPath, 65534, 65534); err != nil {
			testservers.Missing(t, "chown: %v", err)
		}
		defer os.Chown(keyPath, 0, 0)
		_, err := Load(certPath, keyPath)
		if err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
			t.Fatalf("Load of a key owned by another uid = %v", err)
		}
	})

	t.Run("not a regular file", func(t *testing.T) {
		_, err := Load(certPath, filepath.Dir(keyPath))
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("Load of a directory = %v", err)
		}
	})
}

// T-C2: goproxy's built-in CA (its key is public) is refused, identified by
// its public key. The testdata files are copies of goproxy v1.9.2's ca.pem
// and key.pem.
func TestRefusesBuiltinCA(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if err := os.WriteFile(certPath, mustRead(t, "testdata/goproxy-builtin-ca.pem"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, mustRead(t, "testdata/goproxy-builtin-key.pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(certPath, keyPath)
	if err == nil || !strings.Contains(err.Error(), "goproxy's built-in CA") || !strings.Contains(err.Error(), certPath) {
		t.Fatalf("Load(goproxy CA) = %v, want a refusal naming %s", err, certPath)
	}

	// The embedded hash is the SPKI hash of that certificate.
	certs, err := parseCertsPEM(mustRead(t, "testdata/goproxy-builtin-ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(certs[0].RawSubjectPublicKeyInfo)
	if hex.EncodeToString(sum[:]) != goproxyCASPKISHA256 {
		t.Fatal("goproxyCASPKISHA256 does not match testdata/goproxy-builtin-ca.pem")
	}
	// Refused by public key alone, even under another name.
	certs[0].Subject.CommonName = "renamed"
	certs[0].Issuer.CommonName = "renamed"
	if !isGoproxyBuiltin(certs[0]) {
		t.Fatal("the built-in key must be recognised by its SPKI")
	}
}

func TestLoadRefuses(t *testing.T) {
	clock := newFakeClock()
	_, certA, keyA := initCA(t, nil, clock)
	_, certB, keyB := initCA(t, nil, clock)
	dir := t.TempDir()

	// A leaf certificate and its key: not a CA.
	leaf, err := mustLoad(t, certA, keyA).Leaves(LeafOptions{}).Get("leaf.example")
	if err != nil {
		t.Fatal(err)
	}
	leafCert := filepath.Join(dir, "leaf.pem")
	leafKey := filepath.Join(dir, "leaf-key.pem")
	writePEM(t, leafCert, "CERTIFICATE", leaf.Certificate[0], 0o644)
	der, _ := x509.MarshalPKCS8PrivateKey(leaf.PrivateKey)
	writePEM(t, leafKey, "PRIVATE KEY", der, 0o600)

	garbageKey := filepath.Join(dir, "garbage.pem")
	writePEM(t, garbageKey, "PRIVATE KEY", []byte("not a key"), 0o600)
	encKey := filepath.Join(dir, "enc.pem")
	writePEM(t, encKey, "ENCRYPTED PRIVATE KEY", []byte("x"), 0o600)
	noPEM := filepath.Join(dir, "empty.pem")
	if err := os.WriteFile(noPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, cert, key, want string
	}{
		{"missing cert", filepath.Join(dir, "nope.pem"), keyA, "nope.pem"},
		{"missing key", certA, filepath.Join(dir, "nope-key.pem"), "nope-key.pem"},
		{"cert not PEM", noPEM, keyA, "no PEM CERTIFICATE block"},
		{"not a CA", leafCert, leafKey, "not a CA certificate"},
		{"key mismatch", certA, keyB, "does not match certificate file"},
		{"key mismatch reversed", certB, keyA, "does not match certificate file"},
		{"garbage key", certA, garbageKey, "garbage.pem"},
		{"encrypted key", certA, encKey, "encrypted private keys are not supported"},
		{"no key block", certA, noPEM, "no PEM private key block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(tc.cert, tc.key)
			if err == nil || !strings.HasPrefix(err.Error(), "ca: ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load = %v, want a ca: error containing %q", err, tc.want)
			}
		})
	}

	t.Run("expired", func(t *testing.T) {
		_, err := load(certA, keyA, clock.Now().Add(initValidity+time.Hour))
		if err == nil || !strings.Contains(err.Error(), "not valid now") {
			t.Fatalf("load(expired) = %v", err)
		}
	})
}

func writePEM(t *testing.T, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
}

// Load accepts an operator-supplied CA in the other common encodings: a
// SEC1 EC key, and an RSA-2048 CA with a PKCS#1 key. Leaf keys stay P-256.
func TestLoadOtherKeyEncodings(t *testing.T) {
	clock := newFakeClock()
	t.Run("sec1", func(t *testing.T) {
		_, certPath, keyPath := initCA(t, nil, clock)
		c := mustLoad(t, certPath, keyPath)
		der, err := x509.MarshalECPrivateKey(c.key.(*ecdsa.PrivateKey))
		if err != nil {
			t.Fatal(err)
		}
		sec1 := filepath.Join(t.TempDir(), "sec1.pem")
		writePEM(t, sec1, "EC PRIVATE KEY", der, 0o600)
		mustLoad(t, certPath, sec1)
	})
	t.Run("rsa", func(t *testing.T) {
		if testing.Short() {
			t.Skip("RSA key generation is slow")
		}
		for _, bits := range []int{2048, 1024} {
			key, err := rsa.GenerateKey(rand.Reader, bits)
			if err != nil {
				t.Fatal(err)
			}
			tmpl := &x509.Certificate{
				SerialNumber: mustSerial(t), Subject: caSubject("rsa ca"),
				NotBefore: clock.Now().Add(-time.Hour), NotAfter: clock.Now().Add(time.Hour),
				KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
			writePEM(t, certPath, "CERTIFICATE", der, 0o644)
			writePEM(t, keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600)
			c, err := Load(certPath, keyPath)
			if bits < 2048 {
				if err == nil || !strings.Contains(err.Error(), "too small") {
					t.Fatalf("RSA-%d CA accepted: %v", bits, err)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			leaf, err := c.Leaves(LeafOptions{Clock: clock}).Get("rsa.example")
			if err != nil {
				t.Fatal(err)
			}
			verifyLeaf(t, c, leaf.Leaf, "rsa.example", clock.Now())
		}
	})
}

func TestEphemeral(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	out := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(out, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Ephemeral(out, clock)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, out), c.CertPEM()) {
		t.Fatal("cert_out does not hold the CA certificate")
	}
	if bytes.Contains(mustRead(t, out), []byte("PRIVATE KEY")) {
		t.Fatal("cert_out contains a private key")
	}
	fi, _ := os.Stat(out)
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("cert_out mode %04o, want 0644", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("Ephemeral left %d files in the directory, want 1", len(entries))
	}
	cert := c.Certificate()
	if cert.Subject.CommonName != CommonName || !cert.IsCA || cert.NotAfter.Sub(clock.Now()) != ephemeralValidity {
		t.Errorf("ephemeral CA: CN=%q IsCA=%v NotAfter=%v", cert.Subject.CommonName, cert.IsCA, cert.NotAfter)
	}
	leaf, err := c.Leaves(LeafOptions{Clock: clock}).Get("eph.example")
	if err != nil {
		t.Fatal(err)
	}
	verifyLeaf(t, c, leaf.Leaf, "eph.example", clock.Now())

	// Without cert_out nothing is written.
	if _, err := Ephemeral("", clock); err != nil {
		t.Fatal(err)
	}
	// CertPEM is a copy.
	p := c.CertPEM()
	p[0] = 'X'
	if c.CertPEM()[0] == 'X' {
		t.Fatal("CertPEM exposes internal state")
	}
}
