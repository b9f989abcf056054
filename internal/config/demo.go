package config

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/intercept/ca"
)

// DemoTokenFile is the file, beside the config, holding the demo token.
const DemoTokenFile = "demo-token"

// demoServer is the quick start's upstream: an HTTPS server on loopback
// that requires the demo token and reports which headers it received. It
// never echoes a credential: Authorization is shown only as its scheme, its
// length and whether it matched.
type demoServer struct {
	srv *http.Server
	url string
}

func startDemo(addr, dir string, authority *ca.CA, log *zap.Logger) (*demoServer, error) {
	token, err := demoToken(filepath.Join(dir, DemoTokenFile))
	if err != nil {
		return nil, err
	}
	leaf, err := authority.Leaves(ca.LeafOptions{}).Get("localhost")
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("demo.echo: %w", err)
	}
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	d := &demoServer{url: "https://localhost:" + port}
	d.srv = &http.Server{
		Handler:           demoHandler(token),
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{*leaf}, MinVersion: tls.VersionTLS12},
		ErrorLog:          mustStdLog(log),
	}
	go func() {
		if err := d.srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("demo echo stopped", zap.Error(err))
		}
	}()
	return d, nil
}

func (d *demoServer) close() { _ = d.srv.Close() }

// demoToken reads the token file, creating it (0600) with a fresh random
// token on first use.
func demoToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		return strings.TrimSuffix(string(b), "\n"), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("demo: %w", err)
	}
	raw := make([]byte, 16)
	_, _ = rand.Read(raw)
	tok := "kg-demo-" + hex.EncodeToString(raw)
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("demo: %w", err)
	}
	return tok, nil
}

func demoHandler(token string) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		headers := map[string]string{}
		for k, v := range r.Header {
			headers[k] = strings.Join(v, ", ")
		}
		auth := r.Header.Values("Authorization")
		matched := len(auth) == 1 && subtle.ConstantTimeCompare([]byte(auth[0]), want) == 1
		if len(auth) > 0 {
			scheme, _, _ := strings.Cut(auth[0], " ")
			headers["Authorization"] = fmt.Sprintf("%s <%d characters, hidden by the demo>", scheme, len(auth[0]))
		}
		names := make([]string, 0, len(headers))
		for k := range headers {
			names = append(names, k)
		}
		sort.Strings(names)
		status := http.StatusOK
		if !matched {
			status = http.StatusUnauthorized
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]any{
			"demo":                 "keygate echo upstream",
			"authorized":           matched,
			"authorization_values": len(auth),
			"method":               r.Method,
			"path":                 r.URL.Path,
			"headers_received":     headers,
			"header_names":         names,
		})
	})
}

func mustStdLog(l *zap.Logger) *log.Logger {
	std, err := zap.NewStdLogAt(l, zap.DebugLevel)
	if err != nil {
		return log.New(io.Discard, "", 0)
	}
	return std
}
