// Security contract of the process attestor.
//
// What it proves, for a caller on this host (loopback or one of the host's
// addresses, in the broker's network namespace, or a Unix-socket peer):
//
//   - The kernel's record of the connection: for TCP, the peer's socket found
//     by its exact 4-tuple (NETLINK_SOCK_DIAG, else /proc/net/tcp{,6}) and that
//     socket's owner uid; for a Unix socket, SO_PEERCRED (and SO_PEERPIDFD
//     where the kernel has it), captured at connect time.
//   - Which process holds that socket right now (/proc/<pid>/fd), and that it
//     is the same process before and after its details were read: the start
//     time in /proc/<pid>/stat is unchanged, it still holds the socket, its
//     executable link did not change, and (Unix sockets with a pidfd) the
//     connecting process is still alive, so its pid was not reused.
//   - workload.id is "unix:uid:<uid>", where uid is the socket's owner as the
//     kernel recorded it when the socket was created (TCP) or connected (Unix).
//     It must equal the process's effective uid, or the evidence is rejected,
//     so exec'ing a setuid binary after connecting, or dropping privileges
//     while keeping a root-created socket, does not change whom the
//     connection is attributed to. gid is the process's effective gid.
//   - sha256 is the digest of the file the process is executing, read through
//     /proc/<pid>/exe, so renaming or replacing the file at its path cannot
//     fool it. exe is the path the kernel records, in the process's own mount
//     namespace; it is a name, not proof of content: rules that care about the
//     program should match sha256.
//
// What it does not prove:
//
//   - Anything against root on the host (or CAP_SYS_PTRACE, CAP_SYS_ADMIN,
//     CAP_SYS_RESOURCE): such a caller can forge sockets, /proc, cgroups and
//     the exe link, or write into another process.
//   - exe and sha256 are not a boundary between processes of the same uid:
//     they can ptrace each other, and a process can open a connection, queue
//     request bytes and then exec a trusted binary that inherits the socket.
//     The uid is the security boundary; the program is a label within it.
//   - A socket held by several processes (fork, fd passing) is attributed to
//     the first holder found; the kernel does not record who wrote the bytes.
//   - container_id and pod_uid are parsed from /proc/<pid>/cgroup and are only
//     as good as the kernel's cgroup view from the broker's cgroup namespace,
//     and as the parties that may name cgroups: root and the container
//     runtime, but also a user with a delegated subtree. Ids found below a
//     systemd user@<uid>.service (where any user may create
//     "docker-<64 hex>.scope") are therefore ignored. Only 64-hex container
//     ids and UUID pod ids are reported.
//   - Callers in another network namespace (a container with its own network)
//     are not local here: their address is not one of the host's, so the
//     attestor does not apply (ErrNoEvidence). Callers whose socket is found
//     but whose process is invisible (another pid namespace) are rejected with
//     ErrInvalidEvidence ("local peer not found"): they claim to be local and
//     cannot be mapped, which must not fall through to a weaker method.
//
// The broker needs to read other users' /proc/<pid>/fd and /proc/<pid>/exe:
// run it as root or with CAP_SYS_PTRACE (and CAP_DAC_READ_SEARCH); without
// them only callers of the broker's own uid can be attested, and the others
// fail with an internal error rather than a wrong identity.

package attest

import (
	"bufio"
	"bytes"
	"container/list"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/keygate/broker/internal/broker"
)

// ProcessOptions configures the process attestor.
type ProcessOptions struct {
	// ProcRoot is where procfs is mounted; default "/proc". Anything else is
	// for unit tests of the parsers only.
	ProcRoot string
	// Clock drives the short-lived caches; default the system clock.
	Clock broker.Clock
	// HashCacheSize bounds the executable-hash cache; default 1024 entries.
	HashCacheSize int
}

const (
	// ownerTTL is how long an inode→pid mapping is reused before the fd
	// tables are searched again. Every use is re-verified anyway.
	ownerTTL       = 10 * time.Second
	ownerCacheSize = 4096
	// recentOwners is how many recently attested pids are searched first.
	recentOwners = 4
	// hostAddrTTL is how long the host's interface addresses are cached.
	hostAddrTTL = 5 * time.Second
)

// Process attests local callers by the process behind the connection. It is
// safe for concurrent use.
//
// Cost per attestation (Linux, TCP): one netlink round trip to find the
// peer's socket by its exact 4-tuple (no table scan), then the socket inode is
// mapped to a pid. A cached mapping costs one readlink; otherwise the fd
// tables of the few most recently attested pids are searched, then those of
// processes whose /proc/<pid> is owned by the socket's uid (newest first),
// then root-owned ones (non-dumpable processes show as root), stopping at the
// first holder: O(processes) stats plus O(fds) readlinks of the candidates,
// never other users' fd tables. Then stat, status, cgroup and the exe link
// are read (a few µs each) and the executable is hashed once per (device,
// inode, size, mtime, ctime).
type Process struct {
	procRoot string
	clock    broker.Clock

	hashes    *procLRU[exeKey, string]
	hashGroup singleflight.Group

	owners *procLRU[uint64, ownerEntry]

	recentMu sync.Mutex
	recent   []int

	addrMu      sync.Mutex
	addrs       map[netip.Addr]struct{}
	addrFetched time.Time

	sys processSys // platform state
}

// ownerEntry remembers which process held a socket inode.
type ownerEntry struct {
	pid, fd int
	start   uint64
	expires time.Time
}

// exeKey identifies the content of an executable without reading it.
type exeKey struct {
	dev, ino, size uint64
	mtime, ctime   int64 // nanoseconds
}

// NewProcess builds the attestor.
func NewProcess(o ProcessOptions) (*Process, error) {
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	if o.HashCacheSize == 0 {
		o.HashCacheSize = 1024
	}
	if o.HashCacheSize < 0 {
		return nil, fmt.Errorf("attest: process: hash cache size %d is negative", o.HashCacheSize)
	}
	return &Process{
		procRoot: strings.TrimRight(o.ProcRoot, "/"),
		clock:    o.Clock,
		hashes:   newProcLRU[exeKey, string](o.HashCacheSize),
		owners:   newProcLRU[uint64, ownerEntry](ownerCacheSize),
	}, nil
}

// Attest implements broker.Attestor. It applies to Unix-socket peers and to
// TCP callers whose address is loopback or one of this host's; for anyone
// else it returns ErrNoEvidence.
//
// Evidence.Conn should be the accepted connection (wrappers with a NetConn
// method, such as *tls.Conn, are looked through). When it is a *net.TCPConn
// and Evidence.Remote names another address (the caller came through a
// proxy that reported its own client), the attestor does not apply: the
// process at the other end of the socket is the proxy, not the caller.
// Evidence.Local may be the broker's address or, in transparent mode, the
// original destination; both are tried, and so is SO_ORIGINAL_DST.
func (p *Process) Attest(ctx context.Context, ev broker.Evidence) (broker.Identity, error) {
	conn := unwrapNetConn(ev.Conn)
	if uc, ok := conn.(*net.UnixConn); ok {
		return p.attestUnix(ctx, uc)
	}
	remote, local, sockLocal := ev.Remote, ev.Local, ev.Local
	if tc, ok := conn.(*net.TCPConn); ok {
		connRemote := tcpAddrPort(tc.RemoteAddr())
		if !remote.IsValid() {
			remote = connRemote
		} else if !sameTCPAddr(remote, connRemote) {
			return broker.Identity{}, broker.ErrNoEvidence
		}
		if !local.IsValid() {
			local = tcpAddrPort(tc.LocalAddr())
		}
		sockLocal = tcpAddrPort(tc.LocalAddr())
	}
	if !remote.IsValid() || !p.isLocal(remote.Addr(), sockLocal.Addr()) {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	return p.attestTCP(ctx, remote, local, conn)
}

// unwrapNetConn looks through wrappers such as *tls.Conn to the accepted socket.
func unwrapNetConn(c net.Conn) net.Conn {
	for range 8 {
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return c
		}
		inner := w.NetConn()
		if inner == nil || inner == c {
			return c
		}
		c = inner
	}
	return c
}

func tcpAddrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	return netip.AddrPort{}
}

// isLocal reports whether remote is an address of this host. An address added
// in the last few seconds may not be known yet; such a caller gets
// ErrNoEvidence, never a wrong identity.
func (p *Process) isLocal(remote, local netip.Addr) bool {
	remote = remote.Unmap()
	if remote.IsLoopback() {
		return true
	}
	if local.IsValid() && remote == local.Unmap() {
		return true
	}
	p.addrMu.Lock()
	defer p.addrMu.Unlock()
	now := p.clock.Now()
	if p.addrs == nil || now.Sub(p.addrFetched) >= hostAddrTTL || now.Before(p.addrFetched) {
		set := map[netip.Addr]struct{}{}
		if ifAddrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range ifAddrs {
				if n, ok := a.(*net.IPNet); ok {
					if ip, ok := netip.AddrFromSlice(n.IP); ok {
						set[ip.Unmap()] = struct{}{}
					}
				}
			}
		}
		p.addrs, p.addrFetched = set, now
	}
	_, ok := p.addrs[remote.WithZone("")]
	return ok
}

// processIdentity builds the broker identity from verified process details.
func processIdentity(info *broker.ProcessInfo, podUID string) broker.Identity {
	id := broker.Identity{
		ID:      "unix:uid:" + strconv.Itoa(info.UID),
		Method:  broker.MethodProcess,
		Process: info,
	}
	if podUID != "" {
		id.Claims = map[string]any{"pod_uid": podUID}
	}
	return id
}

func processInvalid(format string, args ...any) error {
	return fmt.Errorf("attest: process: "+format+": %w", append(args, broker.ErrInvalidEvidence)...)
}

// --- /proc/net/tcp{,6} -------------------------------------------------------

// procNetEntry is one socket from /proc/net/tcp or tcp6.
type procNetEntry struct {
	local, remote netip.AddrPort
	state         uint8
	uid           uint32
	inode         uint64
}

const tcpListen = 0x0A

// parseProcNetTCPLine parses one line of /proc/net/tcp or /proc/net/tcp6.
// Addresses are printed as the in-memory 32-bit words, so order is the byte
// order of the kernel that wrote them (binary.NativeEndian for the live file).
// The header line and malformed lines return false.
func parseProcNetTCPLine(line []byte, order binary.ByteOrder) (procNetEntry, bool) {
	var e procNetEntry
	f := bytes.Fields(line)
	if len(f) < 10 || len(f[0]) < 2 || f[0][len(f[0])-1] != ':' {
		return e, false
	}
	var ok bool
	if e.local, ok = parseHexAddrPort(f[1], order); !ok {
		return e, false
	}
	if e.remote, ok = parseHexAddrPort(f[2], order); !ok {
		return e, false
	}
	if e.local.Addr().Is4() != e.remote.Addr().Is4() {
		return e, false
	}
	st, err := strconv.ParseUint(string(f[3]), 16, 8)
	if err != nil {
		return e, false
	}
	uid, err := strconv.ParseUint(string(f[7]), 10, 32)
	if err != nil {
		return e, false
	}
	inode, err := strconv.ParseUint(string(f[9]), 10, 64)
	if err != nil {
		return e, false
	}
	e.state, e.uid, e.inode = uint8(st), uint32(uid), inode
	return e, true
}

// parseHexAddrPort parses "0100007F:1F90" (IPv4) or a 32-hex-digit IPv6 form.
func parseHexAddrPort(b []byte, order binary.ByteOrder) (netip.AddrPort, bool) {
	i := bytes.IndexByte(b, ':')
	if (i != 8 && i != 32) || len(b)-i-1 != 4 {
		return netip.AddrPort{}, false
	}
	var raw [16]byte
	n, err := hex.Decode(raw[:], b[:i])
	if err != nil {
		return netip.AddrPort{}, false
	}
	var addr [16]byte
	for w := 0; w < n; w += 4 {
		// The digits are a 32-bit word's value; put its bytes back in the
		// order the kernel held them in memory.
		order.PutUint32(addr[w:], binary.BigEndian.Uint32(raw[w:w+4]))
	}
	port, err := strconv.ParseUint(string(b[i+1:]), 16, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	var a netip.Addr
	if n == 4 {
		a = netip.AddrFrom4([4]byte(addr[:4]))
	} else {
		a = netip.AddrFrom16(addr)
	}
	return netip.AddrPortFrom(a, uint16(port)), true
}

// findProcNetSocket scans a /proc/net/tcp{,6} table for the non-listening
// socket with the given local address and any of the remote addresses
// (IPv4-mapped and plain IPv4 compare equal). Cost: O(sockets in the table).
func findProcNetSocket(r io.Reader, order binary.ByteOrder, local netip.AddrPort, remotes []netip.AddrPort) (procNetEntry, bool, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 512), 64<<10)
	for sc.Scan() {
		e, ok := parseProcNetTCPLine(sc.Bytes(), order)
		if !ok || e.state == tcpListen || e.inode == 0 || !sameTCPAddr(e.local, local) {
			continue
		}
		for _, rem := range remotes {
			if sameTCPAddr(e.remote, rem) {
				return e, true, nil
			}
		}
	}
	return procNetEntry{}, false, sc.Err()
}

func sameTCPAddr(a, b netip.AddrPort) bool {
	return a.Port() == b.Port() && a.Addr().Unmap().WithZone("") == b.Addr().Unmap().WithZone("")
}

// --- /proc/<pid>/stat, status, cgroup ----------------------------------------

// parseStatStartTime returns field 22 (starttime, clock ticks since boot) of
// /proc/<pid>/stat. The command name (field 2) may hold spaces and
// parentheses, so fields are counted after its last ')'.
func parseStatStartTime(data []byte) (uint64, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("stat: no command name")
	}
	f := bytes.Fields(data[i+1:])
	const idx = 22 - 3 // f[0] is field 3 (state)
	if len(f) <= idx {
		return 0, fmt.Errorf("stat: %d fields after the command name", len(f))
	}
	v, err := strconv.ParseUint(string(f[idx]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat: starttime: %w", err)
	}
	return v, nil
}

// parseStatusIDs returns the effective uid and gid from /proc/<pid>/status
// ("Uid:\treal\teffective\tsaved\tfs").
func parseStatusIDs(data []byte) (uid, gid int, err error) {
	uid, gid = -1, -1
	for line := range bytes.SplitSeq(data, []byte{'\n'}) {
		var dst *int
		switch {
		case bytes.HasPrefix(line, []byte("Uid:")):
			dst = &uid
		case bytes.HasPrefix(line, []byte("Gid:")):
			dst = &gid
		default:
			continue
		}
		f := bytes.Fields(line[4:])
		if len(f) < 2 {
			return -1, -1, fmt.Errorf("status: short %q line", line[:3])
		}
		v, err := strconv.ParseUint(string(f[1]), 10, 32)
		if err != nil {
			return -1, -1, fmt.Errorf("status: %s: %w", line[:3], err)
		}
		*dst = int(v)
	}
	if uid < 0 || gid < 0 {
		return -1, -1, errors.New("status: no Uid/Gid lines")
	}
	return uid, gid, nil
}

// parseCgroup extracts the container id (64 hex digits: docker, containerd,
// cri-o, podman; cgroupfs and systemd drivers) and the Kubernetes pod UID from
// /proc/<pid>/cgroup, v1 or v2. The v2 line ("0::") is preferred; within a
// path the innermost id wins. Ids below a systemd user@<uid>.service, where
// an unprivileged user may name cgroups freely, are ignored.
func parseCgroup(data []byte) (containerID, podUID string) {
	var v2, v1 []string
	for line := range strings.SplitSeq(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			v2 = append(v2, parts[2])
		} else {
			v1 = append(v1, parts[2])
		}
	}
	for _, path := range append(v2, v1...) {
		cid, pod := parseCgroupPath(path)
		if containerID == "" {
			containerID = cid
		}
		if podUID == "" {
			podUID = pod
		}
		if containerID != "" && podUID != "" {
			break
		}
	}
	return containerID, podUID
}

func parseCgroupPath(path string) (containerID, podUID string) {
	kube := false
	for seg := range strings.SplitSeq(path, "/") {
		if isUserDelegation(seg) {
			return "", ""
		}
		if strings.Contains(seg, "kubepods") {
			kube = true
		}
		if id := containerIDFromSegment(seg); id != "" {
			containerID = id
		}
		if kube {
			if uid := podUIDFromSegment(seg); uid != "" {
				podUID = uid
			}
		}
	}
	return containerID, podUID
}

// isUserDelegation matches systemd's per-user manager, "user@1000.service".
func isUserDelegation(seg string) bool {
	rest, ok := strings.CutPrefix(seg, "user@")
	if !ok {
		return false
	}
	rest, ok = strings.CutSuffix(rest, ".service")
	return ok && rest != "" && strings.Trim(rest, "0123456789") == ""
}

var containerPrefixes = []string{"docker-", "cri-containerd-", "crio-", "libpod-", "containerd-"}

func containerIDFromSegment(seg string) string {
	if s, ok := strings.CutSuffix(seg, ".scope"); ok {
		for _, pfx := range containerPrefixes {
			if id, ok := strings.CutPrefix(s, pfx); ok && isHexID(id) {
				return id
			}
		}
		return ""
	}
	if isHexID(seg) {
		return seg
	}
	return ""
}

func isHexID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// podUIDFromSegment matches "pod<uid>" (cgroupfs driver) and
// "kubepods-<qos>-pod<uid_with_underscores>.slice" (systemd driver).
func podUIDFromSegment(seg string) string {
	seg = strings.TrimSuffix(seg, ".slice")
	i := strings.LastIndex(seg, "pod")
	if i < 0 || (i > 0 && seg[i-1] != '-') {
		return ""
	}
	uid := strings.ReplaceAll(seg[i+3:], "_", "-")
	if !isUUID(uid) {
		return ""
	}
	return strings.ToLower(uid)
}

func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') && (c < 'A' || c > 'F') {
				return false
			}
		}
	}
	return true
}

// --- bounded LRU -------------------------------------------------------------

type procLRU[K comparable, V any] struct {
	mu  sync.Mutex
	max int
	ll  *list.List
	m   map[K]*list.Element
}

type procLRUItem[K comparable, V any] struct {
	k K
	v V
}

func newProcLRU[K comparable, V any](max int) *procLRU[K, V] {
	return &procLRU[K, V]{max: max, ll: list.New(), m: map[K]*list.Element{}}
}

func (c *procLRU[K, V]) get(k K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[k]; ok {
		c.ll.MoveToFront(e)
		return e.Value.(*procLRUItem[K, V]).v, true
	}
	var zero V
	return zero, false
}

func (c *procLRU[K, V]) put(k K, v V) {
	if c.max <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[k]; ok {
		e.Value.(*procLRUItem[K, V]).v = v
		c.ll.MoveToFront(e)
		return
	}
	c.m[k] = c.ll.PushFront(&procLRUItem[K, V]{k, v})
	for c.ll.Len() > c.max {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.m, last.Value.(*procLRUItem[K, V]).k)
	}
}

func (c *procLRU[K, V]) remove(k K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[k]; ok {
		c.ll.Remove(e)
		delete(c.m, k)
	}
}

func (c *procLRU[K, V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ll.Len()
}
