package intercept

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// BenchmarkTransparent compares, in one run, the same keep-alive HTTPS GETs
// to https://localhost:PORT straight to the upstream, through keygate as an
// explicit proxy (CONNECT), and through keygate's transparent listener. The
// kernel's REDIRECT is played by the client's dialer, which connects to the
// transparent listener and registers the original destination the
// listener's SO_ORIGINAL_DST lookup would return: what is measured is
// keygate's transparent path (peeking the ClientHello, deciding on SNI,
// interception), not netfilter.
func BenchmarkTransparent(b *testing.B) {
	up := benchNewUpstream(b)
	base := "https://" + net.JoinHostPort("localhost", strconv.Itoa(up.port))
	auth := "Bearer " + benchToken
	orig := netip.MustParseAddrPort("127.0.0.1:" + strconv.Itoa(up.port))

	// explicit
	eln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ep, eca := benchNewKeygate(b, up, zap.NewNop(), netip.MustParseAddrPort(eln.Addr().String()), benchKGOpts{host: "localhost"})
	go func() { _ = ep.Serve(eln) }()

	// transparent
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	tp, tca := benchNewKeygate(b, up, zap.NewNop(), netip.MustParseAddrPort(tln.Addr().String()), benchKGOpts{host: "localhost", transparent: true})
	var redirects sync.Map
	tp.origDst = func(c net.Conn) (netip.AddrPort, bool) {
		for range 200 {
			if v, ok := redirects.Load(c.RemoteAddr().String()); ok {
				return v.(netip.AddrPort), true
			}
			time.Sleep(time.Millisecond)
		}
		return netip.AddrPort{}, false
	}
	go func() { _ = tp.ServeTransparent(tln) }()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = ep.Shutdown(ctx)
		_ = tp.Shutdown(ctx)
		_ = tln.Close()
	})

	redirected := benchClient(nil, tca.Certificate(), up.ca)
	redirected.Transport.(*http.Transport).DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", tln.Addr().String())
		if err == nil {
			redirects.Store(c.LocalAddr().String(), orig)
		}
		return c, err
	}
	direct := benchClient(nil, up.ca)
	modes := []benchMode{
		{name: "direct", client: direct, wantIssuer: up.ca},
		{name: "keygate-explicit", client: benchClient(&url.URL{Scheme: "http", Host: eln.Addr().String()}, eca.Certificate(), up.ca), wantAuth: auth, wantIssuer: eca.Certificate(), keygate: true},
		{name: "keygate-transparent", client: redirected, wantAuth: auth, wantIssuer: tca.Certificate(), keygate: true},
	}
	for _, m := range modes {
		b.Cleanup(m.client.CloseIdleConnections)
		benchProbe(b, up, m, base)
	}
	b.Run("interleaved", func(b *testing.B) {
		benchInterleaved(b, modes, base+"/", [][2]string{{"keygate-transparent", "keygate-explicit"}, {"keygate-transparent", "direct"}, {"keygate-explicit", "direct"}})
	})
}
