// Command broker is the keygate egress broker: subcommands, flags, signals
// and logger construction. Everything else lives in internal/.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keygate/broker/configs"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/config"
	"github.com/keygate/broker/internal/harden"
	"github.com/keygate/broker/internal/intercept"
	"github.com/keygate/broker/internal/intercept/ca"
)

// Set by the linker: -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = "unknown"
)

const (
	exitOK    = 0
	exitInput = 1
	exitUsage = 2
)

const usage = `usage: broker <command> [flags]

commands:
  run      [--config FILE]      serve (no config: the embedded quick start)
  validate --config FILE        check a config; print every problem as file:line: message
  explain  --config FILE --identity JSON --method M --url URL
                                dry run: which rule decides and why the others did not
  ca init  --dir DIR [--permit a.com,b.org]
                                create an ECDSA P-256 MITM CA
  test     RULES_TEST.yaml [--config FILE]  run rule unit tests; never contacts a backend
  version                       print version, commit and Go version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "validate":
		return cmdValidate(args[1:], stdout, stderr)
	case "explain":
		return cmdExplain(args[1:], stdout, stderr)
	case "test":
		return cmdTest(args[1:], stdout, stderr)
	case "ca":
		if len(args) < 2 || args[1] != "init" {
			fmt.Fprint(stderr, usage)
			return exitUsage
		}
		return cmdCAInit(args[2:], stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintf(stdout, "keygate broker %s (commit %s, %s)\n", version, commit, runtime.Version())
		return exitOK
	case "help", "--help", "-h":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "broker: unknown command %q\n\n%s", args[0], usage)
	return exitUsage
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("broker "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func newLogger(level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("broker: log level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.Sampling = nil // audit lines are never sampled away
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	cfg.DisableStacktrace = true
	return cfg.Build()
}

func printProblems(w io.Writer, err error) {
	var ps config.Problems
	if errors.As(err, &ps) {
		for _, p := range ps {
			fmt.Fprintln(w, p.Error())
		}
		return
	}
	fmt.Fprintln(w, err)
}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", stderr)
	path := fs.String("config", os.Getenv("BROKER_CONFIG"), "config file (default: $BROKER_CONFIG, else the embedded quick start)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	log, err := newLogger(*level)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitUsage
	}
	defer func() { _ = log.Sync() }()
	// The broker holds credentials in memory: no core dumps, no same-uid
	// ptrace or /proc/PID/mem (SECURITY-TESTS T-B11).
	if st, err := harden.Apply(); err != nil {
		log.Warn("process hardening incomplete", zap.Error(err), zap.Bool("core_limit_zero", st.CoreLimitZero), zap.Bool("not_dumpable", st.NotDumpable))
	}

	var cfg *config.Config
	quickstart := *path == ""
	if quickstart {
		dir := filepath.Join(os.TempDir(), "keygate-quickstart")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			fmt.Fprintln(stderr, "broker:", err)
			return exitInput
		}
		cfg, err = config.ParseEmbedded("quickstart.yaml (embedded)", dir, configs.Quickstart)
	} else {
		cfg, err = config.LoadFile(*path)
	}
	if err != nil {
		printProblems(stderr, err)
		return exitInput
	}
	rt, err := cfg.Build(config.BuildOptions{Logger: log})
	if err != nil {
		printProblems(stderr, err)
		return exitInput
	}
	if quickstart {
		printQuickstart(stdout, rt)
	}
	log.Info("keygate broker serving", zap.Stringer("proxy", rt.ProxyAddr), zap.Any("admin", rt.AdminAddr), zap.String("version", version))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads rules and credentials; a bad file keeps the last good
	// config (Reload logs every problem).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				_ = rt.Reload()
			}
		}
	}()
	if err := rt.Run(ctx); err != nil {
		log.Error("broker stopped", zap.Error(err))
		return exitInput
	}
	return exitOK
}

func printQuickstart(w io.Writer, rt *config.Runtime) {
	fmt.Fprintf(w, `
keygate quick start: no config given, serving the embedded default.

  proxy      http://%[1]s
  admin      http://%[2]s/metrics
  CA         %[3]s
  upstream   %[4]s  (a demo server that requires a token this shell never sees)

In a second terminal, send a request with no credential and watch keygate add it:

  curl --cacert %[3]s --proxy http://%[1]s %[4]s/headers

The demo answers "authorized": true and shows one Authorization header (masked).
A path the rule does not allow is refused by keygate with 403:

  curl --cacert %[3]s --proxy http://%[1]s %[4]s/admin

Go programs, git and most tools take the same settings from the environment:

  export HTTPS_PROXY=http://%[1]s SSL_CERT_FILE=%[3]s GIT_SSL_CAINFO=%[3]s

Every decision is logged as one JSON line below (message "decision").

`, rt.ProxyAddr, rt.AdminAddr, rt.CACertPath, rt.DemoURL)
}

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("validate", stderr)
	path := fs.String("config", "", "config file")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *path == "" {
		fmt.Fprintln(stderr, "broker validate: --config is required")
		return exitUsage
	}
	cfg, err := config.LoadFile(*path)
	if err == nil {
		_, err = cfg.Build(config.BuildOptions{Logger: zap.NewNop(), DryRun: true})
	}
	if err != nil {
		printProblems(stderr, err)
		return exitInput
	}
	fmt.Fprintf(stdout, "%s: ok (%d rules, %d credentials)\n", *path, len(cfg.Rules), len(cfg.Credentials))
	return exitOK
}

func cmdExplain(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("explain", stderr)
	path := fs.String("config", "", "config file")
	idJSON := fs.String("identity", "", `the caller, e.g. {"id":"spiffe://example.org/ci","method":"spiffe-x509","claims":{}}`)
	method := fs.String("method", "GET", "request method")
	rawURL := fs.String("url", "", "request URL, e.g. https://api.github.com/repos/acme/app")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *path == "" || *idJSON == "" || *rawURL == "" {
		fmt.Fprintln(stderr, "broker explain: --config, --identity and --url are required")
		return exitUsage
	}
	// The identity shapes rules see (DESIGN.md §6), for every attestor.
	var idIn struct {
		ID          string         `json:"id"`
		Method      string         `json:"method"`
		TrustDomain string         `json:"trust_domain"`
		Claims      map[string]any `json:"claims"`
		Process     *struct {
			PID         int    `json:"pid"`
			UID         int    `json:"uid"`
			GID         int    `json:"gid"`
			Exe         string `json:"exe"`
			SHA256      string `json:"sha256"`
			ContainerID string `json:"container_id"`
		} `json:"process"`
		Delegator *struct {
			Sub    string         `json:"sub"`
			Claims map[string]any `json:"claims"`
		} `json:"delegator"`
	}
	dec := json.NewDecoder(strings.NewReader(*idJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&idIn); err != nil || idIn.ID == "" || idIn.Method == "" {
		fmt.Fprintln(stderr, `broker explain: --identity must be JSON with at least "id" and "method" (and optionally trust_domain, claims, process, delegator)`)
		return exitInput
	}
	u, err := url.Parse(*rawURL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		fmt.Fprintln(stderr, "broker explain: --url must be an absolute http:// or https:// URL")
		return exitInput
	}
	defPort := 443
	if u.Scheme == "http" {
		defPort = 80
	}
	host, port, err := intercept.SplitHostPort(u.Host, defPort)
	if err != nil {
		fmt.Fprintln(stderr, "broker explain: --url:", err)
		return exitInput
	}
	cfg, err := config.LoadFile(*path)
	var pol *config.Policy
	if err == nil {
		pol, err = cfg.Policy(broker.SystemClock{})
	}
	if err != nil {
		printProblems(stderr, err)
		return exitInput
	}
	id := broker.Identity{ID: idIn.ID, Method: idIn.Method, TrustDomain: idIn.TrustDomain, Claims: idIn.Claims}
	if p := idIn.Process; p != nil {
		id.Process = &broker.ProcessInfo{PID: p.PID, UID: p.UID, GID: p.GID, Exe: p.Exe, SHA256: p.SHA256, ContainerID: p.ContainerID}
	}
	if d := idIn.Delegator; d != nil {
		id.Delegator = broker.Delegator{Sub: d.Sub, Claims: d.Claims}
	}
	t := broker.Target{Phase: broker.PhaseRequest, Protocol: u.Scheme, Host: host, Port: port,
		Method: strings.ToUpper(*method), Path: u.EscapedPath(), Query: u.RawQuery, Headers: map[string]string{}}
	ex := pol.Rules.Explain(id, t)

	out := struct {
		Decision   string `json:"decision"`
		Rule       string `json:"rule"`
		Reason     string `json:"reason,omitempty"`
		Credential *struct {
			Name     string `json:"name"`
			Kind     string `json:"kind"`
			Injector string `json:"injector"`
		} `json:"credential,omitempty"`
		Plaintext  string `json:"plaintext,omitempty"`
		Candidates []struct {
			Rule   string `json:"rule"`
			Reason string `json:"reason"`
		} `json:"candidates"`
	}{Decision: ex.Decision.Action.String(), Rule: ex.Decision.Rule, Reason: ex.Decision.Reason}
	if inj := ex.Decision.Inject; inj != nil && ex.Decision.Action == broker.Allow {
		out.Credential = &struct {
			Name     string `json:"name"`
			Kind     string `json:"kind"`
			Injector string `json:"injector"`
		}{inj.Credential, pol.Kinds[inj.Credential], inj.Injector.Kind()}
		if t.Protocol != broker.ProtocolHTTPS && !ex.Decision.AllowPlaintext {
			out.Plaintext = "the request would be refused: the rule injects a credential and the URL is not https"
		}
	}
	for _, c := range ex.Candidates {
		out.Candidates = append(out.Candidates, struct {
			Rule   string `json:"rule"`
			Reason string `json:"reason"`
		}{c.Rule, c.Reason})
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(out)
		return exitOK
	}
	rule := out.Rule
	if rule == "" {
		rule = "(default deny)"
	}
	fmt.Fprintf(stdout, "decision:   %s\nrule:       %s\n", out.Decision, rule)
	if out.Reason != "" {
		fmt.Fprintf(stdout, "reason:     %s\n", out.Reason)
	}
	if out.Credential != nil {
		fmt.Fprintf(stdout, "credential: %s (source %s), injected as %s\n", out.Credential.Name, out.Credential.Kind, out.Credential.Injector)
	}
	if out.Plaintext != "" {
		fmt.Fprintf(stdout, "note:       %s\n", out.Plaintext)
	}
	fmt.Fprintln(stdout, "candidates:")
	for _, c := range out.Candidates {
		fmt.Fprintf(stdout, "  %-24s %s\n", c.Rule, c.Reason)
	}
	return exitOK
}

func cmdCAInit(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("ca init", stderr)
	dir := fs.String("dir", "", "directory for ca.pem and ca-key.pem")
	permit := fs.String("permit", "", "comma-separated domains the CA may sign for (X.509 name constraints)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *dir == "" {
		fmt.Fprintln(stderr, "broker ca init: --dir is required")
		return exitUsage
	}
	var domains []string
	for _, d := range strings.Split(*permit, ",") {
		if d = strings.TrimSpace(d); d != "" {
			domains = append(domains, d)
		}
	}
	if err := ca.Init(*dir, domains, broker.SystemClock{}); err != nil {
		fmt.Fprintln(stderr, "broker:", err)
		return exitInput
	}
	fmt.Fprintf(stdout, "wrote %s and %s (key mode 0600)\n", filepath.Join(*dir, ca.CertFile), filepath.Join(*dir, ca.KeyFile))
	return exitOK
}
