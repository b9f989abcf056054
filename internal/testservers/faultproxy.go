package testservers

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// FaultProxy is a TCP proxy on 127.0.0.1 in front of a real server (Vault,
// MinIO, PostgreSQL, a recording upstream) whose behaviour a fault test
// switches at run time: pass, down (connection refused), latency, hang
// (accepted, never answered), reset (RST) and limit (close after n bytes).
//
// It is toxiproxy's own proxy and toxics (github.com/Shopify/toxiproxy/v2)
// run in-process: no toxiproxy server, no HTTP API. Toxiproxy does not
// expose how many connections it accepted, so the count comes from its log
// (a zerolog hook on the "Accepted client" event), which it emits once per
// accepted connection, also when the server behind it is down and the
// connection is closed at once. That count is what the "no retry storm"
// criteria (at most N connection attempts per fetch) are measured with.
//
// Every mode change closes the connections already open, so the new mode
// applies to the next connection and a client's idle keep-alive connection
// cannot bypass it.
type FaultProxy struct {
	Addr     string // 127.0.0.1:PORT, stable across Down and Up
	Upstream string // host:port of the server behind it

	t        testing.TB
	mu       sync.Mutex
	proxy    *toxiproxy.Proxy
	mode     string
	accepted atomic.Int64
	failed   atomic.Int64 // accepted, but the server behind was unreachable
}

// Fault modes, as FaultProxy.Mode reports them.
const (
	FaultPass    = "pass"
	FaultDown    = "down"
	FaultLatency = "latency"
	FaultHang    = "hang"
	FaultReset   = "reset"
	FaultLimit   = "limit"
)

// StartFaultProxy starts a proxy in pass mode in front of upstream
// (host:port) and stops it when the test ends.
func StartFaultProxy(t testing.TB, upstream string) *FaultProxy {
	t.Helper()
	p := &FaultProxy{Upstream: upstream, t: t, mode: FaultPass}
	log := zerolog.New(io.Discard).Level(zerolog.InfoLevel).Hook(zerolog.HookFunc(p.observe))
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), log)
	p.proxy = toxiproxy.NewProxy(srv, "fault-"+upstream, "127.0.0.1:0", upstream)
	if err := p.proxy.Start(); err != nil {
		t.Fatalf("testservers: fault proxy in front of %s: %v", upstream, err)
	}
	p.Addr = p.proxy.Listen
	t.Cleanup(p.proxy.Stop)
	return p
}

// observe counts toxiproxy's per-connection log events.
func (p *FaultProxy) observe(_ *zerolog.Event, _ zerolog.Level, msg string) {
	switch msg {
	case "Accepted client":
		p.accepted.Add(1)
	case "Unable to open connection to upstream":
		p.failed.Add(1)
	}
}

// Accepted is the number of TCP connections the proxy accepted since the
// last ResetCounts.
func (p *FaultProxy) Accepted() int64 { return p.accepted.Load() }

// UpstreamFailed is the number of accepted connections for which the
// server behind the proxy could not be reached (it was stopped).
func (p *FaultProxy) UpstreamFailed() int64 { return p.failed.Load() }

// ResetCounts sets Accepted and UpstreamFailed to zero.
func (p *FaultProxy) ResetCounts() {
	p.accepted.Store(0)
	p.failed.Store(0)
}

// Mode is the current fault mode.
func (p *FaultProxy) Mode() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// Pass forwards bytes unchanged.
func (p *FaultProxy) Pass() { p.set(FaultPass) }

// Down closes the listener: connections are refused until another mode is
// set (which listens again on the same address).
func (p *FaultProxy) Down() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.proxy.Toxics.ResetToxics(context.Background())
	p.proxy.Stop()
	p.mode = FaultDown
}

// Latency delays the server's answers by d (requests reach it at once).
func (p *FaultProxy) Latency(d time.Duration) {
	p.set(FaultLatency, toxic{Type: "latency", Stream: "downstream", Attributes: map[string]int64{"latency": d.Milliseconds()}})
}

// Hang accepts connections and forwards nothing in either direction: the
// client waits for an answer that never comes.
func (p *FaultProxy) Hang() {
	p.set(FaultHang,
		toxic{Name: "hang_up", Type: "timeout", Stream: "upstream", Attributes: map[string]int64{"timeout": 0}},
		toxic{Name: "hang_down", Type: "timeout", Stream: "downstream", Attributes: map[string]int64{"timeout": 0}})
}

// Reset answers the first bytes the client sends with a TCP RST after
// delay: the request never reaches the server.
func (p *FaultProxy) Reset(delay time.Duration) {
	p.set(FaultReset, toxic{Type: "reset_peer", Stream: "upstream", Attributes: map[string]int64{"timeout": delay.Milliseconds()}})
}

// Limit closes each connection after the server sent n bytes back.
func (p *FaultProxy) Limit(n int64) {
	p.set(FaultLimit, toxic{Type: "limit_data", Stream: "downstream", Attributes: map[string]int64{"bytes": n}})
}

type toxic struct {
	Name       string           `json:"name,omitempty"`
	Type       string           `json:"type"`
	Stream     string           `json:"stream"`
	Toxicity   float32          `json:"toxicity"`
	Attributes map[string]int64 `json:"attributes"`
}

// set drops the open connections, replaces the toxics and listens again.
func (p *FaultProxy) set(mode string, toxics ...toxic) {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.proxy.Toxics.ResetToxics(context.Background())
	p.proxy.Stop() // closes every open connection; a no-op when down
	for _, tx := range toxics {
		tx.Toxicity = 1
		b, err := json.Marshal(tx)
		if err != nil {
			p.t.Fatalf("testservers: fault proxy: %v", err)
		}
		if _, err := p.proxy.Toxics.AddToxicJson(bytes.NewReader(b)); err != nil {
			p.t.Fatalf("testservers: fault proxy: adding %s: %v", tx.Type, err)
		}
	}
	// The port was ours a moment ago; another process taking it in between
	// is possible but rare, so retry briefly before failing.
	var err error
	for i := 0; i < 50; i++ {
		if err = p.proxy.Start(); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		p.t.Fatalf("testservers: fault proxy: listening again on %s: %v", p.Addr, err)
	}
	p.mode = mode
}

// String names the proxy for test logs.
func (p *FaultProxy) String() string {
	return fmt.Sprintf("fault proxy %s -> %s (%s)", p.Addr, p.Upstream, p.Mode())
}
