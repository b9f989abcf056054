// Package ruletest runs rule unit tests: files that list callers, requests
// and the decision, rule and credential each should get. Tests run against
// the compiled policy of a config (config.Policy), so they never resolve a
// secret and never contact a backend. See docs/rule-tests.md.
package ruletest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/config"
	"github.com/keygate/broker/internal/intercept"
)

// File is a decoded, checked test file.
type File struct {
	Path   string // as given, for messages
	Config string // the config it tests, resolved against the file's directory
	Cases  []Case
}

// Case is one test.
type Case struct {
	Name     string
	Line     int
	Identity broker.Identity
	Target   broker.Target
	Want     Expect
}

// Expect is what a case expects. Rule "" is the default deny; Credential
// "" means no credential is injected.
type Expect struct {
	Decision   string // allow, deny or tunnel
	Rule       string
	Credential string
}

// Result is the outcome of one case.
type Result struct {
	Case   *Case
	Got    Expect
	Reason string // the decision's reason
	Err    error  // the evaluation error behind a deny, if any
	Diffs  []string
}

// Pass reports whether the case got what it expected.
func (r Result) Pass() bool { return len(r.Diffs) == 0 }

// ---- decoding

type fileYAML struct {
	Config string     `yaml:"config"`
	Tests  []caseYAML `yaml:"tests"`
}

type caseYAML struct {
	Name     string        `yaml:"name"`
	Identity *identityYAML `yaml:"identity"`
	Request  *requestYAML  `yaml:"request"`
	Expect   *expectYAML   `yaml:"expect"`
}

type identityYAML struct {
	ID          string         `yaml:"id"`
	Method      string         `yaml:"method"`
	TrustDomain string         `yaml:"trust_domain"`
	Claims      map[string]any `yaml:"claims"`
	Process     *processYAML   `yaml:"process"`
	Delegator   *delegatorYAML `yaml:"delegator"`
}

type processYAML struct {
	PID         int    `yaml:"pid"`
	UID         int    `yaml:"uid"`
	GID         int    `yaml:"gid"`
	Exe         string `yaml:"exe"`
	SHA256      string `yaml:"sha256"`
	ContainerID string `yaml:"container_id"`
}

type delegatorYAML struct {
	Sub    string         `yaml:"sub"`
	Claims map[string]any `yaml:"claims"`
}

type requestYAML struct {
	Method   string            `yaml:"method"`
	URL      string            `yaml:"url"`
	Headers  map[string]string `yaml:"headers"`
	Connect  string            `yaml:"connect"`
	Postgres *postgresYAML     `yaml:"postgres"`
}

// postgresYAML is a PostgreSQL session as a databases: listener decides it:
// the entry's upstream, and the database and user the client asked for.
type postgresYAML struct {
	Upstream string `yaml:"upstream"`
	Database string `yaml:"database"`
	User     string `yaml:"user"`
}

type expectYAML struct {
	Decision   string `yaml:"decision"`
	Rule       string `yaml:"rule"`
	Credential string `yaml:"credential"`
}

// Friendly names for the decoder's type names in messages.
var typeNames = strings.NewReplacer(
	" in type ruletest.fileYAML", " in the test file",
	" in type ruletest.caseYAML", " in a test",
	" in type ruletest.identityYAML", " in identity",
	" in type ruletest.processYAML", " in identity.process",
	" in type ruletest.delegatorYAML", " in identity.delegator",
	" in type ruletest.requestYAML", " in request",
	" in type ruletest.postgresYAML", " in request.postgres",
	" in type ruletest.expectYAML", " in expect",
	" in type ", " in ",
	"ruletest.fileYAML", "the test file",
	"ruletest.caseYAML", "a test",
	"ruletest.identityYAML", "identity",
	"ruletest.processYAML", "identity.process",
	"ruletest.delegatorYAML", "identity.delegator",
	"ruletest.requestYAML", "request",
	"ruletest.postgresYAML", "request.postgres",
	"ruletest.expectYAML", "expect",
)

var knownMethods = map[string]bool{
	broker.MethodSPIFFEX509: true, broker.MethodSPIFFEJWT: true, broker.MethodOIDC: true,
	broker.MethodProcess: true, broker.MethodCIDR: true, broker.MethodAnonymous: true,
}

// Load reads and checks a test file. Every problem is returned at once, as
// config.Problems (file:line: message).
func Load(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, config.Problems{{File: path, Msg: fmt.Sprintf("cannot read: %v", errors.Unwrap(err))}}
	}
	return Parse(path, filepath.Dir(path), data)
}

// Parse decodes data strictly (unknown keys are errors) and checks every
// case. dir is where a relative `config:` resolves.
func Parse(name, dir string, data []byte) (*File, error) {
	p := &parser{name: name}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, config.Problems{{File: name, Line: 1, Msg: "the test file is empty"}}
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, p.yamlProblems(err)
	}
	if root.Kind == yaml.DocumentNode && len(root.Content) > 0 {
		p.root = root.Content[0]
	}
	if p.root == nil || p.root.Kind == 0 {
		return nil, config.Problems{{File: name, Line: 1, Msg: "the test file is empty"}}
	}
	var fy fileYAML
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&fy); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, p.yamlProblems(err)
		}
		p.ps = append(p.ps, p.yamlProblems(err)...)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		p.add(extra.Line, "more than one YAML document; a test file is exactly one")
	}

	f := &File{Path: name}
	if fy.Config != "" {
		f.Config = fy.Config
		if !filepath.IsAbs(f.Config) {
			f.Config = filepath.Join(dir, f.Config)
		}
	}
	if len(fy.Tests) == 0 {
		p.add(p.line("tests"), "no tests: list them under `tests:`")
	}
	seen := map[string]int{}
	for i := range fy.Tests {
		if c, ok := p.checkCase(i, &fy.Tests[i]); ok {
			if prev, dup := seen[c.Name]; dup {
				p.add(c.Line, fmt.Sprintf("test name %q is already used at line %d", c.Name, prev))
				continue
			}
			seen[c.Name] = c.Line
			f.Cases = append(f.Cases, c)
		}
	}
	if len(p.ps) > 0 {
		sort.SliceStable(p.ps, func(i, j int) bool { return p.ps[i].Line < p.ps[j].Line })
		return nil, p.ps
	}
	return f, nil
}

type parser struct {
	name string
	root *yaml.Node
	ps   config.Problems
}

func (p *parser) add(line int, msg string) {
	p.ps = append(p.ps, config.Problem{File: p.name, Line: line, Msg: msg})
}

func (p *parser) yamlProblems(err error) config.Problems {
	return config.YAMLProblems(p.name, err, typeNames)
}

// line finds the line of a node of the test file by path.
func (p *parser) line(path ...any) int {
	if p.root == nil {
		return 1
	}
	return config.NodeLine(p.root, path...)
}

func (p *parser) checkCase(i int, y *caseYAML) (Case, bool) {
	n := len(p.ps)
	at := func(path ...any) int { return p.line(append([]any{"tests", i}, path...)...) }
	c := Case{Name: y.Name, Line: at()}
	if strings.TrimSpace(y.Name) == "" {
		p.add(at(), "test has no name")
	}

	// The identity, in the shapes rules see (DESIGN.md §6).
	switch id := y.Identity; {
	case id == nil:
		p.add(at(), "test has no identity (at least id and method)")
	default:
		if id.ID == "" {
			p.add(at("identity"), "identity.id is required")
		}
		if !knownMethods[id.Method] {
			p.add(at("identity", "method"), fmt.Sprintf("identity.method %q is not one of spiffe-x509, spiffe-jwt, oidc, process, cidr, anonymous", id.Method))
		}
		claims, err := jsonShape(id.Claims)
		if err != nil {
			p.add(at("identity", "claims"), "identity.claims: "+err.Error())
		}
		c.Identity = broker.Identity{ID: id.ID, Method: id.Method, TrustDomain: id.TrustDomain, Claims: claims}
		if pr := id.Process; pr != nil {
			c.Identity.Process = &broker.ProcessInfo{PID: pr.PID, UID: pr.UID, GID: pr.GID, Exe: pr.Exe, SHA256: pr.SHA256, ContainerID: pr.ContainerID}
		}
		if d := id.Delegator; d != nil {
			if d.Sub == "" {
				p.add(at("identity", "delegator"), "identity.delegator.sub is required")
			}
			dc, err := jsonShape(d.Claims)
			if err != nil {
				p.add(at("identity", "delegator", "claims"), "identity.delegator.claims: "+err.Error())
			}
			c.Identity.Delegator = broker.Delegator{Sub: d.Sub, Claims: dc}
		}
	}

	switch r := y.Request; {
	case r == nil:
		p.add(at(), "test has no request (url, connect or postgres)")
	case r.Postgres != nil && (r.Connect != "" || r.URL != "" || r.Method != "" || len(r.Headers) > 0):
		p.add(at("request"), "request.postgres stands alone: a database session has no url, method, headers or connect")
	case r.Postgres != nil:
		pg := r.Postgres
		host, port, err := intercept.SplitHostPort(pg.Upstream, 5432)
		if pg.Upstream == "" || err != nil {
			p.add(at("request", "postgres"), fmt.Sprintf("request.postgres.upstream %q must be the databases entry's upstream host:port", pg.Upstream))
		}
		if pg.Database == "" || pg.User == "" {
			p.add(at("request", "postgres"), "request.postgres needs database and user (what the client asks for)")
		}
		c.Target = broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolPostgres, Host: host, Port: port,
			Database: pg.Database, User: pg.User}
	case r.Connect != "" && (r.URL != "" || r.Method != "" || len(r.Headers) > 0):
		p.add(at("request"), "request.connect stands alone: a CONNECT knows only host and port (no url, method or headers)")
	case r.Connect != "":
		host, port, err := intercept.SplitHostPort(r.Connect, 443)
		if err != nil {
			p.add(at("request", "connect"), fmt.Sprintf("request.connect %q: %v", r.Connect, err))
		}
		c.Target = broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: host, Port: port}
	case r.URL == "":
		p.add(at("request"), "request needs url (or connect, or postgres)")
	default:
		t, msg := requestTarget(r)
		if msg != "" {
			p.add(at("request", "url"), msg)
		}
		headers := make(map[string]string, len(r.Headers))
		for k, v := range r.Headers {
			lk := strings.ToLower(k)
			if _, dup := headers[lk]; dup {
				p.add(at("request", "headers"), fmt.Sprintf("request.headers: %q is given twice (names are case-insensitive)", lk))
			}
			headers[lk] = v
		}
		t.Headers = headers
		c.Target = t
	}

	switch e := y.Expect; {
	case e == nil:
		p.add(at(), "test has no expect (decision, rule, credential)")
	default:
		switch e.Decision {
		case "allow", "deny", "tunnel":
		case "":
			p.add(at("expect"), "expect.decision is required: allow, deny or tunnel")
		default:
			p.add(at("expect", "decision"), fmt.Sprintf("expect.decision %q is not allow, deny or tunnel", e.Decision))
		}
		if e.Decision != "allow" && e.Credential != "" {
			p.add(at("expect", "credential"), fmt.Sprintf("expect.credential is set but only an allow injects a credential (decision %q)", e.Decision))
		}
		if e.Decision == "tunnel" && c.Target.Phase == broker.PhaseRequest {
			p.add(at("expect", "decision"), "a tunnel is decided at CONNECT: use request.connect for tunnel tests")
		}
		c.Want = Expect{Decision: e.Decision, Rule: e.Rule, Credential: e.Credential}
	}
	return c, len(p.ps) == n
}

// requestTarget builds a request-phase target from a URL the way the proxy
// sees the request: normalised host, the scheme's default port, the decoded
// path ("/" when empty).
func requestTarget(r *requestYAML) (broker.Target, string) {
	u, err := url.Parse(r.URL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return broker.Target{}, fmt.Sprintf("request.url %q must be an absolute http:// or https:// URL", r.URL)
	}
	defPort := 443
	if u.Scheme == "http" {
		defPort = 80
	}
	host, port, err := intercept.SplitHostPort(u.Host, defPort)
	if err != nil {
		return broker.Target{}, fmt.Sprintf("request.url %q: %v", r.URL, err)
	}
	method := strings.ToUpper(r.Method)
	if method == "" {
		method = "GET"
	}
	path := u.Path
	if path == "" {
		path = "/"
	}
	return broker.Target{Phase: broker.PhaseRequest, Protocol: u.Scheme, Host: host, Port: port,
		Method: method, Path: path, Query: u.RawQuery}, ""
}

// jsonShape gives claims the types a verified token's claims have (they are
// decoded from JSON: numbers are float64, objects map[string]any).
func jsonShape(m map[string]any) (map[string]any, error) {
	if m == nil {
		return nil, nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("must be JSON-like (string keys, scalars, lists, maps): %v", err)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// ---- running

// Run decides every case with pol and compares.
func (f *File) Run(pol *config.Policy) []Result {
	res := make([]Result, len(f.Cases))
	for i := range f.Cases {
		res[i] = runCase(&f.Cases[i], pol)
	}
	return res
}

func runCase(c *Case, pol *config.Policy) Result {
	ex := pol.Rules.Explain(c.Identity, c.Target)
	d := ex.Decision
	r := Result{Case: c, Reason: d.Reason, Err: ex.Err,
		Got: Expect{Decision: d.Action.String(), Rule: d.Rule}}
	if d.Action == broker.Allow && d.Inject != nil {
		r.Got.Credential = d.Inject.Credential
	}
	reason := fmt.Sprintf("(rule %q, reason %q", d.Rule, d.Reason)
	if ex.Err != nil {
		reason += fmt.Sprintf(", error %q", ex.Err.Error())
	}
	reason += ")"
	if r.Got.Decision != c.Want.Decision {
		r.Diffs = append(r.Diffs, fmt.Sprintf("decision: want %s, got %s %s", c.Want.Decision, r.Got.Decision, reason))
	}
	if r.Got.Rule != c.Want.Rule {
		r.Diffs = append(r.Diffs, fmt.Sprintf("rule: want %s, got %s", ruleName(c.Want.Rule), ruleName(r.Got.Rule)))
	}
	if r.Got.Credential != c.Want.Credential {
		r.Diffs = append(r.Diffs, fmt.Sprintf("credential: want %s, got %s", credName(c.Want.Credential), credName(r.Got.Credential)))
	}
	if len(r.Diffs) > 0 && len(ex.Candidates) > 0 {
		r.Diffs = append(r.Diffs, "rules:")
		for _, cand := range ex.Candidates {
			r.Diffs = append(r.Diffs, fmt.Sprintf("  rule %-24s %s", strconv.Quote(cand.Rule), cand.Reason))
		}
	}
	return r
}

func ruleName(s string) string {
	if s == "" {
		return `"" (default deny)`
	}
	return strconv.Quote(s)
}

func credName(s string) string {
	if s == "" {
		return `"" (none)`
	}
	return strconv.Quote(s)
}

// Options changes how RunFiles finds configs.
type Options struct {
	// Config, when set, is tested instead of each file's `config:`.
	Config string
}

// Summary counts what RunFiles saw.
type Summary struct {
	Passed, Failed int
	Invalid        int // test files or configs that could not be used
}

// OK reports whether every case passed and every file was valid.
func (s Summary) OK() bool { return s.Failed == 0 && s.Invalid == 0 }

// RunFiles loads each test file and its config, runs every case, writes
// PASS/FAIL lines with diffs and a summary to stdout and every problem
// (file:line: message) to stderr. It never contacts a backend and never
// resolves a secret.
func RunFiles(paths []string, o Options, stdout, stderr io.Writer) Summary {
	var sum Summary
	policies := map[string]*config.Policy{}
	bad := map[string]bool{}
	for _, path := range paths {
		f, err := Load(path)
		if err != nil {
			printProblems(stderr, err)
			sum.Invalid++
			continue
		}
		cfgPath := f.Config
		if o.Config != "" {
			cfgPath = o.Config
		}
		if cfgPath == "" {
			fmt.Fprintf(stderr, "%s:1: no config: name it with `config:` (relative to the test file) or pass --config\n", path)
			sum.Invalid++
			continue
		}
		pol, ok := policies[cfgPath]
		if !ok && !bad[cfgPath] {
			c, err := config.LoadFile(cfgPath)
			if err == nil {
				pol, err = c.Policy(broker.SystemClock{})
			}
			if err != nil {
				printProblems(stderr, err)
				bad[cfgPath] = true
			} else {
				policies[cfgPath] = pol
			}
		}
		if pol == nil {
			fmt.Fprintf(stderr, "%s: not run: config %s is invalid\n", path, cfgPath)
			sum.Invalid++
			continue
		}
		for _, r := range f.Run(pol) {
			if r.Pass() {
				sum.Passed++
				fmt.Fprintf(stdout, "PASS %s\n", r.Case.Name)
				continue
			}
			sum.Failed++
			fmt.Fprintf(stdout, "FAIL %s\n    %s:%d\n", r.Case.Name, f.Path, r.Case.Line)
			for _, d := range r.Diffs {
				fmt.Fprintf(stdout, "    %s\n", d)
			}
		}
	}
	fmt.Fprintf(stdout, "%d passed, %d failed\n", sum.Passed, sum.Failed)
	if sum.Invalid > 0 {
		fmt.Fprintf(stdout, "%d test file(s) not run: problems are on stderr\n", sum.Invalid)
	}
	return sum
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
