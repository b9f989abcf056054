package intercept

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/rules"
)

// FuzzRuleInput drives the rule-input builder end to end: an arbitrary
// request head (method, request target, header lines) is written to a real
// Proxy's front door; the policy records the broker.Target it is asked
// about and what CEL reads from it (request.host, .method, .path, .query,
// .headers, through the rules package's activation), the egress dialer
// records the address it is asked to dial, and a net/http upstream records
// the request as it parses it. The upstream and the recording dialer are
// the only stand-ins: a fuzzed host must never reach a real resolver.
// Invariants:
//   - nothing panics (no panic is logged by the proxy or net/http);
//   - the same head gives the same Target and the same status twice;
//   - a forwarded request was decided exactly once, and the host, port,
//     method, path and query the rule saw are the normalised values that
//     were dialled and that the upstream parsed; every header the rule saw
//     reached the upstream with the same value, and no hop-by-hop, proxy
//     or internal header is visible to the rule;
//   - CEL sees exactly the Target's fields.
func FuzzRuleInput(f *testing.F) {
	for _, s := range [][3]string{
		{"GET", "http://api.example.com/v1/items?x=1", "Host: api.example.com"},
		{"POST", "http://API.Example.COM.:8080/a%2Fb/../c?q=%41", "Host: evil.example\nContent-Length: 0"},
		{"GET", "http://127.1/", "Host: 127.1"},
		{"GET", "http://[::ffff:127.0.0.1]:80/x", "Host: x"},
		{"GET", "http://bücher.example/", "Host: x"},
		{"GET", "http://user:pw@allowed.example/", "Host: allowed.example"},
		{"PUT", "http://a.example/p", "Host: a.example\nConnection: X-Secret, keep-alive\nX-Secret: 1\nProxy-Authorization: Basic eDp5\nX-Keygate-Identity: forged\nAuthorization: a\nauthorization: b"},
		{"GET", "http://a.example/", "Host: a.example\nTransfer-Encoding: chunked\nContent-Length: 3"},
		{"get", "http://a.example/%zz", "Host: a.example"},
		{"GET", "/relative", "Host: a.example"},
		{"CONNECT", "a.example:443", "Host: a.example:443"},
		{"GET", "http://a.example:0/", "Host: a.example"},
		{"GET", "http://a.example/ HTTP/1.1\r\nX-Injected: 1\r\n", "Host: a.example"},
		{"GET", "http://[fe80::1%25eth0]/", "Host: x"},
	} {
		f.Add(s[0], s[1], s[2])
	}
	fx := newRuleInputFixture(f)
	f.Fuzz(func(t *testing.T, method, target, headers string) {
		head := method + " " + target + " HTTP/1.1\r\n"
		if headers != "" {
			head += strings.ReplaceAll(headers, "\n", "\r\n") + "\r\n"
		}
		head += "\r\n"
		// Complete any body the head declares, as net/http will read it,
		// so the exchange never waits on the client. CONNECT is decided
		// on its authority alone (FuzzHostNormalize covers that).
		if req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(head))); err == nil {
			switch {
			case req.Method == http.MethodConnect:
				return
			case len(req.TransferEncoding) > 0:
				head += "0\r\n\r\n"
			case req.ContentLength > 4096:
				return
			case req.ContentLength > 0:
				head += strings.Repeat("x", int(req.ContentLength))
			}
		}

		first := fx.exchange(t, head)
		again := fx.exchange(t, head)
		if first.status != again.status || !reflect.DeepEqual(first.decided, again.decided) {
			t.Fatalf("not deterministic: status %d then %d, targets %+v then %+v", first.status, again.status, first.decided, again.decided)
		}
		for _, e := range fx.logs.TakeAll() {
			if strings.Contains(strings.ToLower(e.Message), "panic") {
				t.Fatalf("the proxy logged a panic: %s", e.Message)
			}
		}
		x := first
		if len(x.upstream) == 0 {
			if len(x.dials) != 0 {
				t.Fatalf("nothing reached the upstream (status %d), but %v was dialled", x.status, x.dials)
			}
			return
		}
		if len(x.upstream) != 1 || len(x.decided) != 1 || len(x.dials) != 1 {
			t.Fatalf("%d upstream requests, %d decisions, %d dials; want one each", len(x.upstream), len(x.decided), len(x.dials))
		}
		tg, up, seen := x.decided[0], x.upstream[0], x.seen[0]
		if tg.Phase != broker.PhaseRequest || tg.Protocol != broker.ProtocolHTTP {
			t.Fatalf("decided phase %v protocol %q for a plain request", tg.Phase, tg.Protocol)
		}
		if n, err := NormalizeHost(tg.Host); err != nil || n != tg.Host {
			t.Fatalf("the rule saw host %q, which is not normalised (%q, %v)", tg.Host, n, err)
		}
		if want := joinHostPort(tg.Host, tg.Port); x.dials[0] != want {
			t.Fatalf("the rule saw %s but %s was dialled", want, x.dials[0])
		}
		if up.Method != tg.Method || up.Path != tg.Path || up.RawQuery != tg.Query {
			t.Fatalf("the rule saw %q %q ?%q, the upstream got %q %q ?%q", tg.Method, tg.Path, tg.Query, up.Method, up.Path, up.RawQuery)
		}
		if want := hostHeader(tg.Host, tg.Port, "http"); up.Host != want {
			t.Fatalf("the upstream got Host %q, the rule saw %q", up.Host, want)
		}
		upHeaders := ruleHeaders(up.Header)
		for k, v := range tg.Headers {
			if k != strings.ToLower(k) || hopByHop[k] || hasInternalPrefix(k) {
				t.Fatalf("the rule saw header %q", k)
			}
			if k == "content-length" {
				continue // re-framed by the transport from the body it sends
			}
			if got, ok := upHeaders[k]; !ok || got != v {
				t.Fatalf("the rule saw %s: %q, the upstream got %q (present %v)", k, v, got, ok)
			}
		}
		for k := range upHeaders {
			if _, ok := tg.Headers[k]; ok {
				continue
			}
			// Added by the transport: its framing, its default User-Agent,
			// and Connection: close as keep-alive is off here.
			if k != "user-agent" && k != "content-length" && k != "transfer-encoding" && (k != "connection" || upHeaders[k] != "close") {
				t.Fatalf("the upstream got header %q the rule never saw", k)
			}
		}
		// The CEL view of the headers comes back as JSON, which carries
		// invalid UTF-8 as U+FFFD; the byte-exact comparison of headers is
		// the upstream check above.
		want := celView{Host: tg.Host, Method: tg.Method, Path: tg.Path, Query: tg.Query, Headers: map[string]string{}}
		for k, v := range tg.Headers {
			want.Headers[strings.ToValidUTF8(k, "\uFFFD")] = strings.ToValidUTF8(v, "\uFFFD")
		}
		if !reflect.DeepEqual(seen, want) {
			t.Fatalf("CEL saw %+v, the Target is %+v", seen, want)
		}
	})
}

// celView is what the rule expressions read at request phase.
type celView struct {
	Host, Method, Path, Query string
	Headers                   map[string]string
}

type ruleInputFixture struct {
	proxyAddr string
	logs      *observer.ObservedLogs
	values    map[string]*rules.Value

	mu       sync.Mutex
	decided  []broker.Target
	seen     []celView
	dials    []string
	upstream []upstreamView
	evalErr  error
}

type upstreamView struct {
	Method, Path, RawQuery, Host string
	Header                       http.Header
}

type ruleInputResult struct {
	status   int
	decided  []broker.Target
	seen     []celView
	dials    []string
	upstream []upstreamView
}

func newRuleInputFixture(f *testing.F) *ruleInputFixture {
	fx := &ruleInputFixture{values: map[string]*rules.Value{}}
	for _, e := range []string{"request.host", "request.method", "request.path", "request.query"} {
		v, err := rules.CompileValue(e, rules.ValueString, rules.Options{})
		if err != nil {
			f.Fatal(err)
		}
		fx.values[e] = v
	}
	hv, err := rules.CompileValue("request.headers", rules.ValueJSON, rules.Options{})
	if err != nil {
		f.Fatal(err)
	}
	fx.values["request.headers"] = hv

	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	up := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The body is not read: a declared body the head never sends must
		// not hold the exchange open.
		fx.mu.Lock()
		fx.upstream = append(fx.upstream, upstreamView{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Host: r.Host, Header: r.Header.Clone()})
		fx.mu.Unlock()
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = up.Serve(upLn) }()

	authority, err := ca.Ephemeral("", broker.SystemClock{})
	if err != nil {
		f.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	fx.logs = logs
	p, err := New(Options{
		Pipeline: &broker.Pipeline{Attestor: fixedAttestor{}, Policy: fx},
		Dialer:   &recordingDialer{fx: fx, to: upLn.Addr().String()},
		Leaves:   authority.Leaves(ca.LeafOptions{}),
		Logger:   zap.New(core),
	})
	if err != nil {
		f.Fatal(err)
	}
	// One dial per request, so every request's destination is recorded.
	p.tr.DisableKeepAlives = true
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	fx.proxyAddr = ln.Addr().String()
	go func() { _ = p.Serve(ln) }()
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
		_ = up.Shutdown(ctx)
	})
	return fx
}

// exchange sends one head on a fresh connection and reads the answer. It
// does not half-close: net/http cancels a request whose client closed.
func (fx *ruleInputFixture) exchange(t *testing.T, head string) ruleInputResult {
	t.Helper()
	fx.mu.Lock()
	fx.decided, fx.seen, fx.dials, fx.upstream, fx.evalErr = nil, nil, nil, nil, nil
	fx.mu.Unlock()
	c, err := net.DialTimeout("tcp", fx.proxyAddr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, head); err != nil {
		t.Fatal(err)
	}
	res := ruleInputResult{}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the proxy did not answer within the deadline")
		}
		// net/http closed the connection without an answer.
	} else {
		res.status = resp.StatusCode
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	fx.mu.Lock()
	defer fx.mu.Unlock()
	if fx.evalErr != nil {
		t.Fatalf("evaluating the rule input: %v", fx.evalErr)
	}
	res.decided, res.seen, res.dials, res.upstream = fx.decided, fx.seen, fx.dials, fx.upstream
	return res
}

// Decide records the Target and what CEL reads from it, and allows.
func (fx *ruleInputFixture) Decide(ctx context.Context, id broker.Identity, t broker.Target) (broker.Decision, error) {
	if t.Phase != broker.PhaseRequest {
		return broker.Decision{Action: broker.Allow, Rule: "fuzz"}, nil
	}
	var v celView
	var err error
	str := func(e string) string {
		s, evErr := fx.values[e].Eval(ctx, id, t)
		if evErr != nil && err == nil {
			err = evErr
		}
		return s
	}
	v.Host, v.Method, v.Path, v.Query = str("request.host"), str("request.method"), str("request.path"), str("request.query")
	if js := str("request.headers"); err == nil {
		if jerr := json.Unmarshal([]byte(js), &v.Headers); jerr != nil {
			err = jerr
		}
	}
	fx.mu.Lock()
	fx.decided = append(fx.decided, t)
	fx.seen = append(fx.seen, v)
	if err != nil && fx.evalErr == nil {
		fx.evalErr = err
	}
	fx.mu.Unlock()
	return broker.Decision{Action: broker.Allow, Rule: "fuzz"}, nil
}

type fixedAttestor struct{}

func (fixedAttestor) Attest(context.Context, broker.Evidence) (broker.Identity, error) {
	return broker.Identity{ID: "fuzz", Method: broker.MethodProcess}, nil
}

// recordingDialer stands in for the egress dialer: it records the address
// and connects to the local upstream whatever the name (a fuzzed name must
// not be resolved). Check allows every literal so they reach the rule.
type recordingDialer struct {
	fx *ruleInputFixture
	to string
}

func (d *recordingDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.fx.mu.Lock()
	d.fx.dials = append(d.fx.dials, address)
	d.fx.mu.Unlock()
	var nd net.Dialer
	return nd.DialContext(ctx, network, d.to)
}

func (d *recordingDialer) Check(netip.AddrPort) error { return nil }
