package deploy

// Tests of deploy/keygate-iptables against the real kernel: every case runs
// in fresh network namespaces (ip netns, removed on cleanup) with the real
// nft, iptables (whatever /usr/sbin/iptables is: nf_tables here) and
// iptables-legacy, and checks both the installed ruleset and what real TCP
// connections do.
//
// The traffic topology, per test:
//
//	pod namespace (kgtest-<rand>)            upstream namespace (kgtest-<rand>u)
//	  lo: 127.0.0.1, ::1                       veth: 10.99.0.1, 10.99.0.17,
//	  veth: 10.99.0.2/24, fd99::2/64 <------>        fd99::1, fd99::17
//	  "broker":   127.0.0.1:15001, [::1]:15001   listeners on 80, 443, 5432, 8080
//	  "loopback": 127.0.0.1:443, "self": 10.99.0.2:443
//
// The listeners are opened by this process inside the namespaces (setns on
// a locked thread) and record every connection they accept: the client's
// token, peer and local address, and for the broker SO_ORIGINAL_DST /
// IP6T_SO_ORIGINAL_DST. Clients are this test binary re-executed as a given
// uid (setpriv) inside the pod namespace, so the owner match is real.
//
// They need root. Without it they are skipped, except in CI (CI=true), where
// they must run; a missing tool is likewise a skip locally and a failure in
// CI. Validation, --dry-run and environment-variable tests need neither.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/keygate/broker/internal/canarytest"
)

const (
	script    = "./keygate-iptables"
	brokerUID = 65532 // the script's default exemption and the Dockerfile's USER
	appUID    = 1000  // an application uid: redirected
	toPort    = 15001
)

// backends are the three ways the script can program the kernel.
var backends = []string{"nft", "iptables", "iptables-legacy"}

// Helper mode: the test binary re-executed inside a namespace as a client.
const (
	helperEnv = "KEYGATE_DEPLOY_TEST_DIAL"  // address to dial
	tokenEnv  = "KEYGATE_DEPLOY_TEST_TOKEN" // line to send
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperEnv); addr != "" {
		os.Exit(dialHelper(addr, os.Getenv(tokenEnv)))
	}
	// The helper above stays outside the sweep: its stdout is the answer
	// the parent test reads.
	os.Exit(canarytest.Main(m))
}

// dialHelper connects to addr, sends token, and prints the listener's
// one-line answer (its name). Exit 3 when the connection fails.
func dialHelper(addr, token string) int {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		fmt.Println("dial-error:", err)
		return 3
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(c, token); err != nil {
		fmt.Println("write-error:", err)
		return 3
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Println("read-error:", err)
		return 3
	}
	fmt.Print(line)
	return 0
}

// ---------------------------------------------------------------------------
// Environment checks.

func inCI() bool { return os.Getenv("CI") == "true" }

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if inCI() {
		t.Fatal("keygate-iptables tests need root (network namespaces, nft/iptables, clients as other uids); CI must run them as root")
	}
	t.Skip("keygate-iptables tests need root (network namespaces, nft/iptables, clients as other uids); skipping")
}

// requireTools skips (fails in CI) unless every named command exists.
func requireTools(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			msg := fmt.Sprintf("%s not found: install the Debian packages iptables (iptables, ip6tables, *-legacy, *-nft), nftables, iproute2 and util-linux (setpriv)", n)
			if inCI() {
				t.Fatal(msg)
			}
			t.Skip(msg + "; skipping")
		}
	}
}

func toolsFor(backend string) []string {
	switch backend {
	case "nft":
		return []string{"nft"}
	case "iptables-legacy":
		return []string{"iptables-legacy", "ip6tables-legacy", "iptables-legacy-save", "ip6tables-legacy-save", "iptables-legacy-restore", "ip6tables-legacy-restore"}
	default:
		return []string{"iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore"}
	}
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// ---------------------------------------------------------------------------
// Network namespaces.

type netns struct {
	name string
}

func (n *netns) path() string { return "/run/netns/" + n.name }

// newNetns creates a network namespace with lo up, deleted on cleanup.
func newNetns(t *testing.T, name string) *netns {
	t.Helper()
	mustRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	n := &netns{name: name}
	mustRun(t, "ip", "-n", name, "link", "set", "lo", "up")
	return n
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// exec runs a command inside the namespace.
func (n *netns) exec(env []string, args ...string) (stdout, stderr string, err error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// script runs keygate-iptables inside the namespace and fails the test on error.
func (n *netns) script(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, err := n.exec(nil, append([]string{script}, args...)...)
	if err != nil {
		t.Fatalf("keygate-iptables %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// snapshot is every ruleset the namespace has, in every backend, with the
// volatile parts (comments with timestamps, counters) normalised.
func (n *netns) snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range [][]string{
		{"nft", "list", "ruleset"},
		{"iptables-save", "-t", "nat"},
		{"ip6tables-save", "-t", "nat"},
		{"iptables-legacy-save", "-t", "nat"},
		{"ip6tables-legacy-save", "-t", "nat"},
	} {
		if _, err := exec.LookPath(cmd[0]); err != nil {
			continue
		}
		out, errOut, err := n.exec(nil, cmd...)
		if err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(cmd, " "), err, errOut)
		}
		fmt.Fprintf(&b, "== %s\n%s", strings.Join(cmd, " "), normalise(out))
	}
	return b.String()
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

func normalise(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		keep = append(keep, counters.ReplaceAllString(l, "[0:0]"))
	}
	return strings.Join(keep, "\n")
}

// ipSave is the nat table as the backend's iptables-save prints it.
func (n *netns) ipSave(t *testing.T, backend string, family int) string {
	t.Helper()
	cmd := "iptables-save"
	if family == 6 {
		cmd = "ip6tables-save"
	}
	if backend == "iptables-legacy" {
		cmd = strings.TrimSuffix(cmd, "-save") + "-legacy-save"
	}
	out, errOut, err := n.exec(nil, cmd, "-t", "nat")
	if err != nil {
		t.Fatalf("%s: %v: %s", cmd, err, errOut)
	}
	return normalise(out)
}

// keygateRules is the part of a ruleset the script owns.
func (n *netns) keygateRules(t *testing.T, backend string) string {
	t.Helper()
	if backend == "nft" {
		out, errOut, err := n.exec(nil, "nft", "list", "table", "inet", "keygate")
		if err != nil {
			t.Fatalf("nft list table inet keygate: %v: %s", err, errOut)
		}
		return out
	}
	var b strings.Builder
	for _, fam := range []int{4, 6} {
		fmt.Fprintf(&b, "== IPv%d\n", fam)
		for _, l := range strings.Split(n.ipSave(t, backend, fam), "\n") {
			if strings.Contains(l, "KEYGATE_OUTPUT") {
				b.WriteString(l + "\n")
			}
		}
	}
	return b.String()
}

// ---------------------------------------------------------------------------
// Listeners inside a namespace.

// record is one accepted connection.
type record struct {
	token string
	peer  netip.AddrPort
	local netip.AddrPort
	orig  netip.AddrPort // broker listeners only
	err   string         // SO_ORIGINAL_DST failure
}

type recorder struct {
	mu   sync.Mutex
	seen map[string]record
}

func (r *recorder) get(token string) (record, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.seen[token]
	return rec, ok
}

// listenIn opens a TCP listener inside ns. The socket is created on a
// locked OS thread that has joined ns; that goroutine exits without
// unlocking, so the Go runtime discards the thread and no other goroutine
// ever runs in the wrong namespace.
func listenIn(t *testing.T, ns *netns, addr string) net.Listener {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(ns.path())
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("setns %s: %w", ns.name, err)}
			return
		}
		ln, err := net.Listen("tcp", addr)
		ch <- result{ln, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns.name, r.err)
	}
	t.Cleanup(func() { _ = r.ln.Close() })
	return r.ln
}

// serve answers each connection with name and records it.
func serve(t *testing.T, ln net.Listener, name string, broker bool) *recorder {
	r := &recorder{seen: map[string]record{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				rec := record{
					token: strings.TrimSpace(line),
					peer:  c.RemoteAddr().(*net.TCPAddr).AddrPort(),
					local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
				}
				if broker {
					orig, err := originalDst(c.(*net.TCPConn))
					rec.orig = orig
					if err != nil {
						rec.err = err.Error()
					}
				}
				r.mu.Lock()
				r.seen[rec.token] = rec
				r.mu.Unlock()
				_, _ = fmt.Fprintln(c, name)
			}(c)
		}
	}()
	return r
}

// originalDst reads SO_ORIGINAL_DST (IPv4, level SOL_IP) or
// IP6T_SO_ORIGINAL_DST (IPv6, level SOL_IPV6); both are option 80. Written
// here independently of the broker's own implementation.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	const soOriginalDst = 80
	level := unix.SOL_IP
	if c.LocalAddr().(*net.TCPAddr).IP.To4() == nil {
		level = unix.SOL_IPV6
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var (
		buf  [28]byte // sizeof(struct sockaddr_in6); sockaddr_in fits
		size = uint32(len(buf))
		serr error
	)
	if err := raw.Control(func(fd uintptr) {
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		if e != 0 {
			serr = e
		}
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt(SO_ORIGINAL_DST): %w", serr)
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	switch binary.NativeEndian.Uint16(buf[0:2]) {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
	}
	return netip.AddrPort{}, errors.New("SO_ORIGINAL_DST: unknown address family")
}

// ---------------------------------------------------------------------------
// The two-namespace topology.

type topology struct {
	pod, up *netns
	// Recorders by listener name.
	listeners map[string]*recorder
	client    string // the test binary, executable by every uid
	tokens    atomic.Int64
}

var (
	pod4, pod6 = netip.MustParseAddr("10.99.0.2"), netip.MustParseAddr("fd99::2")
	up4, up6   = netip.MustParseAddr("10.99.0.1"), netip.MustParseAddr("fd99::1")
	// In the exempt prefixes 10.99.0.16/28 and fd99::10/124.
	exempt4, exempt6 = netip.MustParseAddr("10.99.0.17"), netip.MustParseAddr("fd99::17")
)

const (
	exemptCIDR4 = "10.99.0.16/28"
	exemptCIDR6 = "fd99::10/124"
)

// newTopology builds the pod and upstream namespaces, joined by a veth pair.
// brokerAddrs are where the stand-in broker listens inside the pod.
func newTopology(t *testing.T, brokerAddrs ...string) *topology {
	t.Helper()
	requireRoot(t)
	requireTools(t, "ip", "setpriv")
	id := randHex(t, 4)
	tp := &topology{
		pod:       newNetns(t, "kgtest-"+id),
		up:        newNetns(t, "kgtest-"+id+"u"),
		listeners: map[string]*recorder{},
		client:    publicBinary(t),
	}
	podIf, upIf := "kg"+id+"p", "kg"+id+"u"
	mustRun(t, "ip", "-n", tp.pod.name, "link", "add", podIf, "type", "veth", "peer", "name", upIf, "netns", tp.up.name)
	for _, a := range []struct {
		ns   *netns
		dev  string
		addr string
	}{
		{tp.pod, podIf, "10.99.0.2/24"}, {tp.pod, podIf, "fd99::2/64"},
		{tp.up, upIf, "10.99.0.1/24"}, {tp.up, upIf, "10.99.0.17/24"},
		{tp.up, upIf, "fd99::1/64"}, {tp.up, upIf, "fd99::17/64"},
	} {
		args := []string{"-n", a.ns.name, "addr", "add", a.addr, "dev", a.dev}
		if strings.Contains(a.addr, ":") {
			args = append(args, "nodad") // usable at once, no duplicate address detection delay
		}
		mustRun(t, "ip", args...)
	}
	mustRun(t, "ip", "-n", tp.pod.name, "link", "set", podIf, "up")
	mustRun(t, "ip", "-n", tp.up.name, "link", "set", upIf, "up")

	for _, addr := range brokerAddrs {
		tp.listen(t, tp.pod, addr, "broker", true)
	}
	tp.listen(t, tp.pod, "127.0.0.1:443", "loopback", false)
	tp.listen(t, tp.pod, "[::1]:443", "loopback", false)
	tp.listen(t, tp.pod, "10.99.0.2:443", "self", false)
	for _, a := range []netip.Addr{up4, up6, exempt4, exempt6} {
		for _, p := range []uint16{80, 443, 5432, 8080} {
			tp.listen(t, tp.up, netip.AddrPortFrom(a, p).String(), "upstream", false)
		}
	}
	return tp
}

// listen adds a listener whose records are filed under name (several
// listeners may share a name).
func (tp *topology) listen(t *testing.T, ns *netns, addr, name string, broker bool) {
	t.Helper()
	r := serve(t, listenIn(t, ns, addr), name, broker)
	tp.listeners[name+" "+addr] = r
}

// find returns the record of token, and the listener that holds it.
func (tp *topology) find(token string) (string, record, bool) {
	for k, r := range tp.listeners {
		if rec, ok := r.get(token); ok {
			return k, rec, true
		}
	}
	return "", record{}, false
}

// publicBinary copies the test binary where every uid can execute it.
func publicBinary(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "kgtest-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "client")
	if err := os.WriteFile(dst, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// dial connects from the pod namespace as uid to dst and returns the name of
// the listener that answered and its record of the connection. A failed
// connection returns name "" and the client's output.
func (tp *topology) dial(t *testing.T, uid int, dst netip.AddrPort) (string, record, string) {
	t.Helper()
	token := fmt.Sprintf("%s#%d", t.Name(), tp.tokens.Add(1))
	u := strconv.Itoa(uid)
	out, errOut, err := tp.pod.exec(
		// GORACE: a -race binary otherwise sleeps 1s at exit.
		[]string{helperEnv + "=" + dst.String(), tokenEnv + "=" + token, "GORACE=atexit_sleep_ms=0"},
		"setpriv", "--reuid="+u, "--regid="+u, "--clear-groups", "--", tp.client)
	if err != nil {
		return "", record{}, strings.TrimSpace(out + errOut)
	}
	answered := strings.TrimSpace(out)
	// The listener records before it answers, so the record is there.
	key, rec, ok := tp.find(token)
	if !ok {
		t.Fatalf("dial %s as uid %d: %q answered but no listener recorded token %q", dst, uid, answered, token)
	}
	if name := strings.SplitN(key, " ", 2)[0]; name != answered {
		t.Fatalf("dial %s: answer %q from listener %q", dst, answered, key)
	}
	return answered, rec, key
}

// expectRedirect asserts that uid's connection to dst reached the broker
// stand-in on loopback, from the pod's own address, with dst as its original
// destination.
func (tp *topology) expectRedirect(t *testing.T, uid int, dst netip.AddrPort) {
	t.Helper()
	name, rec, key := tp.dial(t, uid, dst)
	if name != "broker" {
		t.Errorf("uid %d -> %s: reached %q (%s), want the broker (redirected)", uid, dst, name, key)
		return
	}
	loop, src := netip.MustParseAddr("127.0.0.1"), pod4
	if dst.Addr().Is6() {
		loop, src = netip.IPv6Loopback(), pod6
	}
	if want := netip.AddrPortFrom(loop, toPort); rec.local != want {
		t.Errorf("uid %d -> %s: redirected to %s, want %s (REDIRECT in OUTPUT targets loopback)", uid, dst, rec.local, want)
	}
	if rec.peer.Addr() != src {
		t.Errorf("uid %d -> %s: broker saw the peer %s, want the pod's address %s", uid, dst, rec.peer, src)
	}
	if rec.err != "" || rec.orig != dst {
		t.Errorf("uid %d -> %s: original destination %s (%s), want %s", uid, dst, rec.orig, rec.err, dst)
	}
}

// expectDirect asserts that uid's connection to dst reached the listener
// named want, not the broker.
func (tp *topology) expectDirect(t *testing.T, uid int, dst netip.AddrPort, want string) {
	t.Helper()
	name, _, key := tp.dial(t, uid, dst)
	if name != want {
		t.Errorf("uid %d -> %s: reached %q (%s), want %q (not redirected)", uid, dst, name, key, want)
	}
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// ---------------------------------------------------------------------------
// Traffic.

// TestRedirectTraffic is the real check: with each backend, real
// connections from an application uid are redirected to the broker with
// their original destination intact, and everything exempt goes direct.
func TestRedirectTraffic(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			requireRoot(t)
			requireTools(t, toolsFor(backend)...)
			tp := newTopology(t, "127.0.0.1:15001", "[::1]:15001")

			// Listed ports, with exemptions by uid, prefix and port.
			tp.pod.script(t, "--backend", backend, "--ports", "443,8080,5432",
				"--exempt-uid", strconv.Itoa(brokerUID), "--exempt-cidr", exemptCIDR4+","+exemptCIDR6,
				"--exempt-port", "5432")
			t.Run("ports", func(t *testing.T) {
				for _, a := range []netip.Addr{up4, up6} {
					tp.expectRedirect(t, appUID, ap(a, 443))
					tp.expectRedirect(t, appUID, ap(a, 8080))
					tp.expectRedirect(t, 0, ap(a, 443)) // root is not exempt unless listed
					tp.expectDirect(t, brokerUID, ap(a, 443), "upstream")
					tp.expectDirect(t, appUID, ap(a, 80), "upstream")   // not in --ports
					tp.expectDirect(t, appUID, ap(a, 5432), "upstream") // --exempt-port wins over --ports
				}
				tp.expectDirect(t, appUID, ap(exempt4, 443), "upstream") // --exempt-cidr
				tp.expectDirect(t, appUID, ap(exempt6, 443), "upstream")
				tp.expectDirect(t, appUID, netip.MustParseAddrPort("127.0.0.1:443"), "loopback")
				tp.expectDirect(t, appUID, netip.MustParseAddrPort("[::1]:443"), "loopback")
				tp.expectDirect(t, appUID, ap(pod4, 443), "self") // the pod's own address goes via lo
			})

			// Re-running with other settings replaces the rules: 8080 is no
			// longer listed, every port is, the exemptions are gone.
			tp.pod.script(t, "--backend", backend, "--all-ports", "--exempt-uid", "65532,4242")
			t.Run("all-ports", func(t *testing.T) {
				for _, a := range []netip.Addr{up4, up6, exempt4, exempt6} {
					tp.expectRedirect(t, appUID, ap(a, 5432))
					tp.expectRedirect(t, appUID, ap(a, 80))
					tp.expectDirect(t, brokerUID, ap(a, 80), "upstream")
					tp.expectDirect(t, 4242, ap(a, 80), "upstream")
				}
				tp.expectDirect(t, appUID, netip.MustParseAddrPort("127.0.0.1:443"), "loopback")
				tp.expectDirect(t, appUID, ap(pod4, 443), "self")
			})

			// One family only: the other is left alone (and warned about).
			tp.pod.script(t, "--backend", backend, "--ipv4-only")
			t.Run("ipv4-only", func(t *testing.T) {
				tp.expectRedirect(t, appUID, ap(up4, 443))
				tp.expectDirect(t, appUID, ap(up6, 443), "upstream")
			})
			tp.pod.script(t, "--backend", backend, "--ipv6-only")
			t.Run("ipv6-only", func(t *testing.T) {
				tp.expectRedirect(t, appUID, ap(up6, 443))
				tp.expectDirect(t, appUID, ap(up4, 443), "upstream")
			})

			// Removed: nothing is redirected any more.
			tp.pod.script(t, "--backend", backend, "--remove")
			t.Run("removed", func(t *testing.T) {
				tp.expectDirect(t, appUID, ap(up4, 443), "upstream")
				tp.expectDirect(t, appUID, ap(up6, 443), "upstream")
			})
		})
	}
}

// TestRedirectTargetIsLoopback verifies the addressing the manifests rely
// on: REDIRECT in nat OUTPUT rewrites the destination to 127.0.0.1 / ::1, so
// a broker listening only on the pod's own address is never reached (the
// application's connection is refused: fail closed), while one on a wildcard
// address is.
func TestRedirectTargetIsLoopback(t *testing.T) {
	requireRoot(t)
	requireTools(t, "nft")
	t.Run("pod-address", func(t *testing.T) {
		tp := newTopology(t, "10.99.0.2:15001", "[fd99::2]:15001")
		tp.pod.script(t, "--backend", "nft")
		for _, dst := range []netip.AddrPort{ap(up4, 443), ap(up6, 443)} {
			if name, _, out := tp.dial(t, appUID, dst); name != "" || !strings.Contains(out, "connection refused") {
				t.Errorf("%s with the broker on the pod address: reached %q (%s), want connection refused", dst, name, out)
			}
		}
	})
	t.Run("wildcard", func(t *testing.T) {
		tp := newTopology(t, "[::]:15001") // dual-stack: IPv4 arrives as ::ffff:127.0.0.1
		tp.pod.script(t, "--backend", "nft")
		name, rec, key := tp.dial(t, appUID, ap(up6, 443))
		if name != "broker" || rec.orig != ap(up6, 443) || rec.local.Addr() != netip.IPv6Loopback() {
			t.Errorf("IPv6 with a wildcard broker: %q %+v (%s)", name, rec, key)
		}
		name, rec, key = tp.dial(t, appUID, ap(up4, 443))
		if name != "broker" || rec.local.Addr().Unmap() != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("IPv4 with a wildcard broker: %q %+v (%s)", name, rec, key)
		}
	})
}

// ---------------------------------------------------------------------------
// Rulesets.

// foreign installs rules that are not the script's, so --remove can be shown
// to leave them alone.
func foreign(t *testing.T, ns *netns, backend string) {
	t.Helper()
	var cmds [][]string
	switch backend {
	case "nft":
		cmds = [][]string{
			{"nft", "add", "table", "inet", "other"},
			{"nft", "add", "chain", "inet", "other", "out", "{ type nat hook output priority -100; policy accept; }"},
			{"nft", "add", "rule", "inet", "other", "out", "ip", "daddr", "192.0.2.1", "return"},
		}
	default:
		ipt, ip6t := "iptables", "ip6tables"
		if backend == "iptables-legacy" {
			ipt, ip6t = "iptables-legacy", "ip6tables-legacy"
		}
		cmds = [][]string{
			{ipt, "-w", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.1/32", "-j", "RETURN"},
			{ip6t, "-w", "-t", "nat", "-A", "OUTPUT", "-d", "2001:db8::1/128", "-j", "RETURN"},
			{ipt, "-w", "-t", "nat", "-N", "OTHER"},
		}
	}
	for _, c := range cmds {
		if out, errOut, err := ns.exec(nil, c...); err != nil {
			t.Fatalf("%s: %v %s %s", strings.Join(c, " "), err, out, errOut)
		}
	}
}

// TestRulesets checks the installed rules per backend: exact content,
// idempotency, --dry-run changing nothing, and --remove restoring the
// namespace exactly, other rules included.
func TestRulesets(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			requireRoot(t)
			requireTools(t, append(toolsFor(backend), "ip")...)
			ns := newNetns(t, "kgtest-"+randHex(t, 4))
			foreign(t, ns, backend)
			before := ns.snapshot(t)

			args := []string{"--backend", backend, "--ports", "80,443,5432", "--exempt-uid", "65532", "--exempt-uid", "1337",
				"--exempt-cidr", "10.0.0.0/8", "--exempt-cidr", "fd00::/8", "--exempt-port", "22", "--to-port", "15001"}

			dry := ns.script(t, append(args, "--dry-run")...)
			if got := ns.snapshot(t); got != before {
				t.Fatalf("--dry-run changed the ruleset:\n%s\nwant\n%s", got, before)
			}

			ns.script(t, args...)
			first := ns.snapshot(t)
			rules := ns.keygateRules(t, backend)
			want := wantRules(backend)
			if backend == "nft" {
				for _, l := range want {
					if !strings.Contains(rules, l) {
						t.Errorf("nft table lacks %q:\n%s", l, rules)
					}
				}
			} else if got := strings.Split(strings.TrimSpace(rules), "\n"); !slices.Equal(got, want) {
				t.Errorf("%s rules:\n%s\nwant:\n%s", backend, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if backend != "nft" && !strings.Contains(first, "-A OUTPUT -d 192.0.2.1/32 -j RETURN") {
				t.Errorf("the foreign rule is gone after install:\n%s", first)
			}

			// The dry run printed exactly what was applied: replaying it in a
			// fresh namespace gives the same rules.
			replay := newNetns(t, "kgtest-"+randHex(t, 4))
			replayDryRun(t, replay, backend, dry)
			if got := replay.keygateRules(t, backend); got != rules {
				t.Errorf("--dry-run output applied by hand:\n%s\nthe script applied:\n%s", got, rules)
			}

			ns.script(t, args...)
			if second := ns.snapshot(t); second != first {
				t.Errorf("second run changed the ruleset (not idempotent):\n%s\nfirst:\n%s", second, first)
			}

			ns.script(t, append(args, "--remove", "--dry-run")...)
			if got := ns.snapshot(t); got != first {
				t.Errorf("--remove --dry-run changed the ruleset")
			}

			ns.script(t, "--backend", backend, "--remove")
			if after := ns.snapshot(t); after != before {
				t.Errorf("after --remove:\n%s\nbefore install:\n%s", after, before)
			}
			ns.script(t, "--backend", backend, "--remove") // nothing left: still succeeds
			if after := ns.snapshot(t); after != before {
				t.Errorf("after a second --remove:\n%s\nbefore install:\n%s", after, before)
			}
		})
	}
}

// wantRules is what TestRulesets' settings install: for nft, lines the table
// must contain; for iptables, the exact KEYGATE_OUTPUT lines of iptables-save.
func wantRules(backend string) []string {
	if backend == "nft" {
		return []string{
			"type nat hook output priority -100; policy accept;",
			"meta l4proto != tcp return",
			`oifname "lo" return`,
			"ip daddr 127.0.0.0/8 return",
			"ip6 daddr ::1 return",
			"meta skuid { 1337, 65532 } return",
			"ip daddr 10.0.0.0/8 return",
			"ip6 daddr fd00::/8 return",
			"tcp dport 22 return",
			"tcp dport { 80, 443, 5432 } redirect to :15001",
		}
	}
	var out []string
	for _, fam := range []struct{ name, loop, cidr string }{{"4", "127.0.0.0/8", "10.0.0.0/8"}, {"6", "::1/128", "fd00::/8"}} {
		out = append(out,
			"== IPv"+fam.name,
			":KEYGATE_OUTPUT - [0:0]",
			"-A OUTPUT -p tcp -j KEYGATE_OUTPUT",
			"-A KEYGATE_OUTPUT -o lo -j RETURN",
			"-A KEYGATE_OUTPUT -d "+fam.loop+" -j RETURN",
			"-A KEYGATE_OUTPUT -m owner --uid-owner 65532 -j RETURN",
			"-A KEYGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
			"-A KEYGATE_OUTPUT -d "+fam.cidr+" -j RETURN",
			"-A KEYGATE_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
			"-A KEYGATE_OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 15001",
			"-A KEYGATE_OUTPUT -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 15001",
			"-A KEYGATE_OUTPUT -p tcp -m tcp --dport 5432 -j REDIRECT --to-ports 15001",
		)
	}
	return out
}

// replayDryRun applies --dry-run output by hand: the nft script with
// nft -f, each iptables-restore block with the restore command it names.
func replayDryRun(t *testing.T, ns *netns, backend, dry string) {
	t.Helper()
	if backend == "nft" {
		cmd := exec.Command("ip", "netns", "exec", ns.name, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(dry)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft -f <dry-run output>: %v\n%s\n%s", err, out, dry)
		}
		return
	}
	blocks := regexp.MustCompile(`(?m)^# keygate-iptables: (\S+) --noflush -w.*\n`).FindAllStringSubmatchIndex(dry, -1)
	if len(blocks) != 2 {
		t.Fatalf("--dry-run printed %d iptables-restore blocks, want 2 (IPv4, IPv6):\n%s", len(blocks), dry)
	}
	for i, b := range blocks {
		end := len(dry)
		if i+1 < len(blocks) {
			end = blocks[i+1][0]
		}
		restore := dry[b[2]:b[3]]
		cmd := exec.Command("ip", "netns", "exec", ns.name, restore, "-w", "--noflush")
		cmd.Stdin = strings.NewReader(dry[b[1]:end])
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s <dry-run block>: %v\n%s\n%s", restore, err, out, dry[b[1]:end])
		}
	}
}

// ---------------------------------------------------------------------------
// Privileges: what the init container needs.

// TestCapabilities runs the script as root with a bounding set reduced to
// what the Kubernetes init container is given: CAP_NET_ADMIN suffices for
// nft and iptables-nft; iptables-legacy also needs CAP_NET_RAW.
func TestCapabilities(t *testing.T) {
	requireRoot(t)
	requireTools(t, "ip", "setpriv", "nft", "iptables", "iptables-legacy")
	for _, c := range []struct {
		backend, caps string
		ok            bool
	}{
		{"nft", "net_admin", true},
		{"iptables", "net_admin", true},
		{"iptables-legacy", "net_admin", false},
		{"iptables-legacy", "net_admin,+net_raw", true},
		{"nft", "net_raw", false},
	} {
		t.Run(c.backend+"+"+c.caps, func(t *testing.T) {
			ns := newNetns(t, "kgtest-"+randHex(t, 4))
			before := ns.snapshot(t)
			_, errOut, err := ns.exec(nil, "setpriv", "--bounding-set=-all,+"+c.caps, "--inh-caps=-all", "--",
				script, "--backend", c.backend)
			if c.ok && err != nil {
				t.Fatalf("with only %s: %v\n%s", c.caps, err, errOut)
			}
			if !c.ok {
				if err == nil {
					t.Fatalf("with only %s the script succeeded, want a failure", c.caps)
				}
				if !strings.Contains(errOut, "hint: this needs CAP_NET_ADMIN") {
					t.Errorf("failure without the permission hint:\n%s", errOut)
				}
				if ns.snapshot(t) != before {
					t.Errorf("a failed run changed the ruleset")
				}
			}
		})
	}
}

// TestReadOnlyRoot runs the script with a read-only root filesystem, /run
// and /tmp, as in the init container (readOnlyRootFilesystem): nft and
// iptables-nft write nothing; iptables-legacy needs a writable /run for its
// lock file, which the manifests provide with an emptyDir.
func TestReadOnlyRoot(t *testing.T) {
	requireRoot(t)
	requireTools(t, "ip", "unshare", "nft", "iptables", "iptables-legacy")
	const ro = `set -e
mount --make-rprivate /
for m in / /run /tmp /var /etc; do
  if [ "$m" = / ] || mountpoint -q "$m"; then mount -o remount,bind,ro "$m" || exit 99; fi
done
# /run as the image has it: empty (an existing lock file would hide the
# problem), read-only unless the manifest's emptyDir is mounted there.
if [ -n "${WRITABLE_RUN:-}" ]; then mount -t tmpfs tmpfs /run; else mount -t tmpfs -o ro tmpfs /run; fi
exec "$@"`
	for _, c := range []struct {
		backend string
		run     bool // a writable /run (the emptyDir)
		ok      bool
	}{
		{"nft", false, true},
		{"iptables", false, true},
		{"iptables-legacy", false, false},
		{"iptables-legacy", true, true},
	} {
		t.Run(fmt.Sprintf("%s/writable-run=%v", c.backend, c.run), func(t *testing.T) {
			ns := newNetns(t, "kgtest-"+randHex(t, 4))
			var env []string
			if c.run {
				env = append(env, "WRITABLE_RUN=1")
			}
			abs, err := filepath.Abs(script)
			if err != nil {
				t.Fatal(err)
			}
			_, errOut, err := ns.exec(env, "unshare", "-m", "sh", "-c", ro, "sh", abs, "--backend", c.backend)
			var ee *exec.ExitError
			if errors.As(err, &ee) && ee.ExitCode() == 99 {
				if inCI() {
					t.Fatalf("cannot remount read-only here (CI must allow mount namespaces): %s", errOut)
				}
				t.Skipf("cannot remount read-only here: %s", errOut)
			}
			if c.ok && err != nil {
				t.Fatalf("read-only root: %v\n%s", err, errOut)
			}
			if !c.ok && err == nil {
				t.Fatalf("read-only root and /run: %s succeeded, want a failure (lock file)", c.backend)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Validation, dry run and environment: no root needed.

// runScript runs the script outside any namespace. Safe: every call here
// either fails validation or passes --dry-run.
func runScript(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(script, args...)
	cmd.Env = append(cleanEnv(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

// cleanEnv is the environment without any KEYGATE_ variable.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYGATE_") {
			env = append(env, kv)
		}
	}
	return env
}

// TestValidation feeds invalid values. Each must be refused with a message
// naming the problem and a non-zero status, before anything is touched:
// as root the script runs in a fresh namespace whose ruleset must not
// change; otherwise --dry-run keeps it harmless.
func TestValidation(t *testing.T) {
	var ns *netns
	var before string
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("nft"); err == nil {
			ns = newNetns(t, "kgtest-"+randHex(t, 4))
			before = ns.snapshot(t)
		}
	}
	for _, c := range []struct {
		args []string
		env  []string
		code int
		msg  string
	}{
		{args: []string{"--to-port", "0"}, code: 1, msg: "--to-port: '0' is not a port"},
		{args: []string{"--to-port", "65536"}, code: 1, msg: "is not a port"},
		{args: []string{"--to-port", "080"}, code: 1, msg: "'080' is not a port"},
		{args: []string{"--to-port", "15001x"}, code: 1, msg: "is not a port"},
		{args: []string{"--ports", "80,0"}, code: 1, msg: "--ports: '0' is not a port"},
		{args: []string{"--ports", "80-90"}, code: 1, msg: "--ports: '80-90' is not a port"},
		{args: []string{"--ports", ","}, code: 1, msg: "--ports: no port given"},
		{args: []string{"--exempt-port", "99999"}, code: 1, msg: "--exempt-port: '99999'"},
		{args: []string{"--exempt-uid", "-1"}, code: 1, msg: "--exempt-uid: '-1' is not a uid"},
		{args: []string{"--exempt-uid", "root"}, code: 1, msg: "is not a uid"},
		{args: []string{"--exempt-uid", "4294967295"}, code: 1, msg: "is not a uid"},
		{args: []string{"--exempt-uid", ","}, code: 1, msg: "at least the broker's uid"},
		{args: []string{"--exempt-cidr", "10.0.0.0"}, code: 1, msg: "'10.0.0.0' is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "10.0.0.0/33"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "10.0.0.256/8"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "10.0.0/8"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "010.0.0.0/8"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "fd00::/129"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "fd00:::1/64"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "1::2::3/64"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "1:2:3:4:5:6:7:8:9/64"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "12345::/16"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "fe80::1%eth0/64"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--exempt-cidr", "10.0.0.0/8;reboot"}, code: 1, msg: "is not a CIDR prefix"},
		{args: []string{"--backend", "ipfw"}, code: 1, msg: "--backend: 'ipfw' is not one of"},
		{args: []string{"--ports", "80", "--all-ports"}, code: 2, msg: "exclude each other"},
		{args: []string{"--ipv4-only", "--ipv6-only"}, code: 2, msg: "exclude each other"},
		{args: []string{"--frobnicate"}, code: 2, msg: "unknown option: --frobnicate"},
		{args: []string{"--to-port"}, code: 2, msg: "--to-port needs a value"},
		{args: []string{"--dry-run=yes"}, code: 2, msg: "--dry-run takes no value"},
		{env: []string{"KEYGATE_TO_PORT=http"}, code: 1, msg: "--to-port: 'http' is not a port"},
		{env: []string{"KEYGATE_EXEMPT_CIDRS=10.0.0.0/8 bogus"}, code: 1, msg: "'bogus' is not a CIDR prefix"},
		{env: []string{"KEYGATE_DRY_RUN=maybe"}, code: 1, msg: "KEYGATE_DRY_RUN must be true or false"},
		{env: []string{"KEYGATE_ALL_PORTS=true", "KEYGATE_PORTS=443"}, code: 2, msg: "exclude each other"},
	} {
		name := strings.Join(append(c.env, c.args...), " ")
		t.Run(name, func(t *testing.T) {
			var errOut string
			var code int
			if ns != nil {
				cmd := exec.Command("ip", append([]string{"netns", "exec", ns.name, script, "--backend", "nft"}, c.args...)...)
				cmd.Env = append(cleanEnv(), c.env...)
				var e bytes.Buffer
				cmd.Stderr = &e
				err := cmd.Run()
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					code = ee.ExitCode()
				}
				errOut = e.String()
				if got := ns.snapshot(t); got != before {
					t.Errorf("the ruleset changed:\n%s", got)
				}
			} else {
				_, errOut, code = runScript(t, c.env, append([]string{"--dry-run"}, c.args...)...)
			}
			if code != c.code || !strings.Contains(errOut, c.msg) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, errOut, c.code, c.msg)
			}
		})
	}
}

// TestValidValues: addresses and values the validator must accept.
func TestValidValues(t *testing.T) {
	for _, v := range []string{"0.0.0.0/0", "10.0.0.0/8", "192.168.1.1/32", "::/0", "::1/128", "fd00::/8",
		"2001:db8::/32", "2001:DB8:0:0:0:0:0:1/128", "1:2:3:4:5:6:7::/112", "::ffff:10.0.0.0/104", "64:ff9b::/96"} {
		if _, errOut, code := runScript(t, nil, "--dry-run", "--backend", "nft", "--exempt-cidr", v); code != 0 {
			t.Errorf("--exempt-cidr %s refused: %s", v, errOut)
		}
	}
	out, _, _ := runScript(t, nil, "--dry-run", "--backend", "nft", "--exempt-cidr", "2001:DB8::/32")
	if !strings.Contains(out, "2001:db8::/32") {
		t.Errorf("IPv6 prefix not lower-cased:\n%s", out)
	}
	for _, v := range []string{"0", "1", "65532", "4294967294"} {
		if _, errOut, code := runScript(t, nil, "--dry-run", "--exempt-uid", v); code != 0 {
			t.Errorf("--exempt-uid %s refused: %s", v, errOut)
		}
	}
}

// TestDryRunNeedsNoPrivilege runs --dry-run as an unprivileged uid (when
// root, via setpriv) for every backend, including --remove.
func TestDryRunNeedsNoPrivilege(t *testing.T) {
	prefix := []string{}
	if os.Geteuid() == 0 {
		requireTools(t, "setpriv")
		prefix = []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"}
	}
	abs, err := filepath.Abs(script)
	if err != nil {
		t.Fatal(err)
	}
	for _, backend := range append([]string{"auto"}, append(backends, "iptables-nft")...) {
		for _, extra := range [][]string{nil, {"--remove"}} {
			args := append(append(prefix, abs, "--dry-run", "--backend", backend), extra...)
			cmd := exec.Command(args[0], args[1:]...)
			cmd.Env = cleanEnv()
			out, err := cmd.Output()
			if err != nil {
				var ee *exec.ExitError
				errors.As(err, &ee)
				t.Errorf("%s: %v\n%s", strings.Join(args, " "), err, ee.Stderr)
				continue
			}
			if len(extra) == 0 && !strings.Contains(string(out), "15001") {
				t.Errorf("%s: no redirect in the output:\n%s", strings.Join(args, " "), out)
			}
		}
	}
}

// TestEnvironmentEquivalents: every flag has an environment variable, and
// the command line wins over the environment.
func TestEnvironmentEquivalents(t *testing.T) {
	flags := []string{"--dry-run", "--backend", "iptables", "--to-port", "15002", "--ports", "443,8443",
		"--exempt-uid", "1000", "--exempt-uid", "65532", "--exempt-cidr", "10.0.0.0/8", "--exempt-cidr", "fd00::/8",
		"--exempt-port", "22,2222", "--ipv4-only"}
	env := []string{"KEYGATE_DRY_RUN=true", "KEYGATE_BACKEND=iptables", "KEYGATE_TO_PORT=15002", "KEYGATE_PORTS=443 8443",
		"KEYGATE_EXEMPT_UIDS=1000,65532", "KEYGATE_EXEMPT_CIDRS=10.0.0.0/8, fd00::/8", "KEYGATE_EXEMPT_PORTS=22,2222",
		"KEYGATE_IPV4_ONLY=true"}
	a, _, codeA := runScript(t, nil, flags...)
	b, _, codeB := runScript(t, env)
	if codeA != 0 || codeB != 0 || a != b {
		t.Errorf("flags (exit %d):\n%s\nenvironment (exit %d):\n%s", codeA, a, codeB, b)
	}
	for _, c := range []struct {
		env  []string
		args []string
		want string
	}{
		{[]string{"KEYGATE_ALL_PORTS=1"}, []string{"--backend", "nft"}, "meta l4proto tcp redirect to :15001"},
		{[]string{"KEYGATE_IPV6_ONLY=yes"}, []string{"--backend", "nft"}, "meta nfproto ipv6 tcp dport { 80, 443 } redirect"},
		{[]string{"KEYGATE_REMOVE=true"}, []string{"--backend", "nft"}, "delete table inet keygate"},
		{[]string{"KEYGATE_TO_PORT=15002"}, []string{"--backend", "nft", "--to-port", "15003"}, "redirect to :15003"},
		{[]string{"KEYGATE_EXEMPT_UIDS=1"}, []string{"--backend", "nft", "--exempt-uid", "2"}, "meta skuid { 2 } return"},
		{[]string{"KEYGATE_EXEMPT_UIDS=1"}, []string{"--backend", "nft"}, "meta skuid { 1 } return"},
		{nil, []string{"--backend", "nft"}, "meta skuid { 65532 } return"},
		{[]string{"KEYGATE_EXEMPT_CIDRS=10.0.0.0/8"}, []string{"--backend", "nft", "--exempt-cidr", "172.16.0.0/12"}, "ip daddr { 172.16.0.0/12 } return"},
		{[]string{"KEYGATE_PORTS=443"}, []string{"--backend", "nft", "--ports=8443"}, "tcp dport { 8443 } redirect"},
	} {
		out, errOut, code := runScript(t, c.env, append([]string{"--dry-run"}, c.args...)...)
		if code != 0 || !strings.Contains(out, c.want) {
			t.Errorf("%v %v: exit %d, want %q in:\n%s%s", c.env, c.args, code, c.want, out, errOut)
		}
	}
}

// TestPOSIXShells: the script gives the same output under every available
// shell (it is POSIX sh: init images may have dash or busybox, not bash).
func TestPOSIXShells(t *testing.T) {
	args := []string{script, "--dry-run", "--backend", "iptables", "--exempt-cidr", "10.0.0.0/8,::ffff:10.0.0.0/104", "--exempt-port", "22"}
	var ref string
	n := 0
	for _, sh := range [][]string{{"dash"}, {"bash", "--posix"}, {"busybox", "sh"}, {"sh"}} {
		if _, err := exec.LookPath(sh[0]); err != nil {
			continue
		}
		cmd := exec.Command(sh[0], append(sh[1:], args...)...)
		cmd.Env = cleanEnv()
		out, err := cmd.Output()
		if err != nil {
			t.Errorf("%s: %v", sh[0], err)
			continue
		}
		if n++; n == 1 {
			ref = string(out)
		} else if string(out) != ref {
			t.Errorf("%s prints something else:\n%s\nwant\n%s", sh[0], out, ref)
		}
	}
}

// TestShellcheck lints the script when shellcheck is installed (Debian
// package shellcheck).
func TestShellcheck(t *testing.T) {
	if _, err := exec.LookPath("shellcheck"); err != nil {
		if inCI() {
			t.Fatal("shellcheck is required in CI (scripts/deps.sh installs it)")
		}
		t.Skip("shellcheck not installed; skipping the lint")
	}
	if out, err := exec.Command("shellcheck", "-s", "sh", script).CombinedOutput(); err != nil {
		t.Errorf("shellcheck: %v\n%s", err, out)
	}
}

// TestDefaultExemptUIDMatchesDockerfile: the script's default exemption is
// the uid the broker image runs as, so the broker's own connections are
// never redirected back to it.
func TestDefaultExemptUIDMatchesDockerfile(t *testing.T) {
	out, _, code := runScript(t, nil, "--dry-run", "--backend", "nft")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("meta skuid { %d } return", brokerUID)) {
		t.Fatalf("default exemption is not uid %d:\n%s", brokerUID, out)
	}
	f, err := os.Open("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	users := dockerfileUsers(t, f)
	if got := users["broker"]; got != fmt.Sprintf("%d:%d", brokerUID, brokerUID) {
		t.Errorf("Dockerfile USER of the broker stage is %q, want %d:%d (the script's default --exempt-uid)", got, brokerUID, brokerUID)
	}
}

// dockerfileUsers maps each named stage (FROM ... AS name) to its last USER.
func dockerfileUsers(t *testing.T, r io.Reader) map[string]string {
	t.Helper()
	users := map[string]string{}
	stage := ""
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			stage = ""
			if len(f) >= 4 && strings.EqualFold(f[len(f)-2], "AS") {
				stage = f[len(f)-1]
			}
		case "USER":
			if len(f) == 2 && stage != "" {
				users[stage] = f[1]
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return users
}

// TestAutoBackend: with the default backend, a failing nft (here a stand-in
// that always fails, first in PATH) falls back to iptables, and --remove
// removes what either backend installed.
func TestAutoBackend(t *testing.T) {
	requireRoot(t)
	requireTools(t, append(toolsFor("iptables"), "ip", "nft")...)
	ns := newNetns(t, "kgtest-"+randHex(t, 4))
	// The nat tables exist before (iptables-nft keeps their empty built-in
	// chains after --remove), with a rule that must survive.
	foreign(t, ns, "iptables")
	before := ns.snapshot(t)
	fake := t.TempDir()
	if err := os.WriteFile(filepath.Join(fake, "nft"), []byte("#!/bin/sh\necho 'nft: simulated failure' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, errOut, err := ns.exec([]string{"PATH=" + fake + ":" + os.Getenv("PATH")}, script)
	if err != nil {
		t.Fatalf("auto with a failing nft: %v\n%s", err, errOut)
	}
	if !strings.Contains(errOut, "falling back to iptables") {
		t.Errorf("no fallback warning:\n%s", errOut)
	}
	if rules := ns.keygateRules(t, "iptables"); !strings.Contains(rules, "-j REDIRECT --to-ports 15001") {
		t.Errorf("no iptables rules after the fallback:\n%s", rules)
	}
	ns.script(t) // the real nft: now both backends hold rules
	ns.keygateRules(t, "nft")
	ns.script(t, "--remove")
	if after := ns.snapshot(t); after != before {
		t.Errorf("auto --remove left:\n%s\nbefore:\n%s", after, before)
	}
}
