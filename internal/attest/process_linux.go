//go:build linux

package attest

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/keygate/broker/internal/origdst"

	"github.com/keygate/broker/internal/broker"
)

// Netlink availability: unknown until the first answer; broken when the
// kernel lacks NETLINK_SOCK_DIAG/tcp_diag (or a sandbox forbids it), after
// which /proc/net/tcp{,6} is parsed instead.
const (
	netlinkUnknown int32 = iota
	netlinkWorks
	netlinkBroken
)

type processSys struct {
	netlink atomic.Int32
	seq     atomic.Uint32
}

var (
	errSockNotFound = errors.New("socket not found")
	errStaleOwner   = errors.New("cached socket owner is stale")
)

// peerSocket is the caller's end of the connection.
type peerSocket struct {
	inode uint64
	uid   uint32
}

func socketLinkName(inode uint64) string { return "socket:[" + strconv.FormatUint(inode, 10) + "]" }

// --- TCP ---------------------------------------------------------------------

func (p *Process) attestTCP(ctx context.Context, remote, local netip.AddrPort, conn net.Conn) (broker.Identity, error) {
	s, err := p.findSocket(remote, local, conn)
	if err != nil {
		return broker.Identity{}, err
	}
	for attempt := 0; ; attempt++ {
		own, err := p.findOwner(ctx, s, attempt == 0)
		if err != nil {
			return broker.Identity{}, err
		}
		target := socketLinkName(s.inode)
		info, pod, start, err := p.inspect(own.pid, own.start, func() error {
			fd, ok := p.holdsSocket(own.pid, own.fd, target)
			if !ok {
				return processInvalid("process %d no longer holds the connection", own.pid)
			}
			own.fd = fd
			return nil
		})
		if errors.Is(err, errStaleOwner) && attempt == 0 {
			p.owners.remove(s.inode)
			continue
		}
		if err != nil {
			return broker.Identity{}, err
		}
		if info.UID != int(s.uid) {
			return broker.Identity{}, processInvalid("socket owner uid %d differs from process %d's effective uid %d", s.uid, own.pid, info.UID)
		}
		own.start, own.expires = start, p.clock.Now().Add(ownerTTL)
		p.owners.put(s.inode, own)
		p.noteRecent(own.pid)
		return processIdentity(info, pod), nil
	}
}

// findSocket finds the caller's socket: local address = remote, remote
// address = the broker's side. The broker's side is tried as the evidence
// gives it, as the accepted socket's own address, and (transparent mode) as
// the pre-NAT destination, all of which name this one connection.
func (p *Process) findSocket(remote, local netip.AddrPort, conn net.Conn) (peerSocket, error) {
	var peers []netip.AddrPort
	add := func(a netip.AddrPort) {
		if a.IsValid() && !slices.ContainsFunc(peers, func(b netip.AddrPort) bool { return sameTCPAddr(a, b) }) {
			peers = append(peers, a)
		}
	}
	add(local)
	tc, _ := conn.(*net.TCPConn)
	if tc != nil {
		add(tcpAddrPort(tc.LocalAddr()))
	}
	s, err := p.lookupSocket(remote, peers)
	if errors.Is(err, errSockNotFound) && tc != nil {
		if od, ok := originalDst(tc); ok {
			s, err = p.lookupSocket(remote, []netip.AddrPort{od})
		}
	}
	if errors.Is(err, errSockNotFound) {
		return peerSocket{}, processInvalid("local peer %s not found: no such TCP socket on this host", remote)
	}
	return s, err
}

func (p *Process) lookupSocket(remote netip.AddrPort, peers []netip.AddrPort) (peerSocket, error) {
	if len(peers) == 0 {
		return peerSocket{}, errSockNotFound
	}
	tried := false
	if p.sys.netlink.Load() != netlinkBroken {
		tried = true
		s, err := p.diagLookup(remote, peers)
		switch {
		case err == nil:
			p.sys.netlink.Store(netlinkWorks)
			return s, nil
		case errors.Is(err, errSockNotFound):
			if p.sys.netlink.Load() == netlinkWorks {
				return peerSocket{}, err
			}
			// Never answered yet: ENOENT may mean "no tcp_diag". Let
			// procfs decide, and remember if it disagrees.
		case errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.EAFNOSUPPORT),
			errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM),
			errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
			p.sys.netlink.Store(netlinkBroken)
		}
	}
	s, err := p.procNetLookup(remote, peers)
	if err == nil && tried {
		p.sys.netlink.CompareAndSwap(netlinkUnknown, netlinkBroken)
	}
	return s, err
}

// procNetLookup scans /proc/net/tcp and tcp6: O(sockets), the fallback.
func (p *Process) procNetLookup(remote netip.AddrPort, peers []netip.AddrPort) (peerSocket, error) {
	files := []string{"tcp6"}
	if remote.Addr().Unmap().Is4() {
		files = []string{"tcp", "tcp6"} // dual-stack sockets show v4 as ::ffff:a.b.c.d
	}
	for _, name := range files {
		f, err := os.Open(p.procRoot + "/net/" + name)
		if errors.Is(err, fs.ErrNotExist) {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return peerSocket{}, fmt.Errorf("attest: process: %w", err)
		}
		e, ok, err := findProcNetSocket(f, binary.NativeEndian, remote, peers)
		f.Close()
		if err != nil {
			return peerSocket{}, fmt.Errorf("attest: process: reading /proc/net/%s: %w", name, err)
		}
		if ok {
			return peerSocket{inode: e.inode, uid: e.uid}, nil
		}
	}
	return peerSocket{}, errSockNotFound
}

// inet_diag wire sizes (linux/inet_diag.h).
const (
	sizeofInetDiagReqV2 = 56
	sizeofInetDiagMsg   = 72
	inetDiagNoCookie    = ^uint32(0)
)

// diagLookup asks the kernel for the one socket with local address src and
// remote address one of dsts (an exact lookup, not a dump).
func (p *Process) diagLookup(src netip.AddrPort, dsts []netip.AddrPort) (peerSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return peerSocket{}, fmt.Errorf("attest: process: netlink socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 1}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return peerSocket{}, fmt.Errorf("attest: process: netlink: %w", err)
	}
	src = netip.AddrPortFrom(src.Addr().Unmap().WithZone(""), src.Port())
	for _, dst := range dsts {
		dst = netip.AddrPortFrom(dst.Addr().Unmap().WithZone(""), dst.Port())
		if dst.Addr().Is4() != src.Addr().Is4() {
			continue
		}
		s, err := p.diagQuery(fd, src, dst)
		if errors.Is(err, errSockNotFound) {
			continue
		}
		return s, err
	}
	return peerSocket{}, errSockNotFound
}

func (p *Process) diagQuery(fd int, src, dst netip.AddrPort) (peerSocket, error) {
	ne := binary.NativeEndian
	var msg [unix.SizeofNlMsghdr + sizeofInetDiagReqV2]byte
	seq := p.sys.seq.Add(1)
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(msg[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(msg[8:], seq)
	r := msg[unix.SizeofNlMsghdr:]
	family := uint8(unix.AF_INET6)
	if src.Addr().Is4() {
		family = unix.AF_INET
	}
	r[0], r[1] = family, unix.IPPROTO_TCP
	ne.PutUint32(r[4:], ^uint32(0)) // all states
	id := r[8:]
	binary.BigEndian.PutUint16(id[0:], src.Port())
	binary.BigEndian.PutUint16(id[2:], dst.Port())
	putDiagAddr(id[4:20], src.Addr())
	putDiagAddr(id[20:36], dst.Addr())
	ne.PutUint32(id[40:], inetDiagNoCookie)
	ne.PutUint32(id[44:], inetDiagNoCookie)

	for {
		err := unix.Sendto(fd, msg[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return peerSocket{}, fmt.Errorf("attest: process: netlink send: %w", err)
		}
		break
	}
	var buf [1024]byte
	for {
		n, _, err := unix.Recvfrom(fd, buf[:], 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return peerSocket{}, fmt.Errorf("attest: process: netlink receive: %w", err)
		}
		b := buf[:n]
		if len(b) < unix.SizeofNlMsghdr {
			return peerSocket{}, errors.New("attest: process: netlink: short reply")
		}
		l, typ, rseq := ne.Uint32(b[0:]), ne.Uint16(b[4:]), ne.Uint32(b[8:])
		if rseq != seq {
			continue // not ours (cannot happen on a private socket)
		}
		if int(l) > len(b) || l < unix.SizeofNlMsghdr {
			return peerSocket{}, errors.New("attest: process: netlink: bad reply length")
		}
		b = b[unix.SizeofNlMsghdr:l]
		switch typ {
		case unix.NLMSG_ERROR:
			if len(b) < 4 {
				return peerSocket{}, errors.New("attest: process: netlink: short error")
			}
			errno := unix.Errno(-int32(ne.Uint32(b)))
			if errno == unix.ENOENT {
				return peerSocket{}, errSockNotFound
			}
			return peerSocket{}, fmt.Errorf("attest: process: netlink: %w", errno)
		case unix.SOCK_DIAG_BY_FAMILY:
			return parseDiagMsg(b, src, dst)
		default:
			return peerSocket{}, fmt.Errorf("attest: process: netlink: unexpected message type %d", typ)
		}
	}
}

func putDiagAddr(dst []byte, a netip.Addr) {
	if a.Is4() {
		b := a.As4()
		copy(dst, b[:])
		return
	}
	b := a.As16()
	copy(dst, b[:])
}

// parseDiagMsg reads struct inet_diag_msg and checks it is the socket asked
// for: the kernel's exact lookup may also return a listener or a TIME_WAIT
// socket, neither of which belongs to a process.
func parseDiagMsg(b []byte, src, dst netip.AddrPort) (peerSocket, error) {
	if len(b) < sizeofInetDiagMsg {
		return peerSocket{}, errors.New("attest: process: netlink: short inet_diag_msg")
	}
	family, state := b[0], b[1]
	id := b[4:52]
	var gotSrc, gotDst netip.Addr
	switch family {
	case unix.AF_INET:
		gotSrc, gotDst = netip.AddrFrom4([4]byte(id[4:8])), netip.AddrFrom4([4]byte(id[20:24]))
	case unix.AF_INET6:
		gotSrc, gotDst = netip.AddrFrom16([16]byte(id[4:20])), netip.AddrFrom16([16]byte(id[20:36]))
	default:
		return peerSocket{}, fmt.Errorf("attest: process: netlink: family %d", family)
	}
	got1 := netip.AddrPortFrom(gotSrc, binary.BigEndian.Uint16(id[0:]))
	got2 := netip.AddrPortFrom(gotDst, binary.BigEndian.Uint16(id[2:]))
	uid := binary.NativeEndian.Uint32(b[64:])
	inode := binary.NativeEndian.Uint32(b[68:])
	if !sameTCPAddr(got1, src) || !sameTCPAddr(got2, dst) || state == tcpListen || inode == 0 {
		return peerSocket{}, errSockNotFound
	}
	return peerSocket{inode: uint64(inode), uid: uid}, nil
}

// originalDst returns the pre-NAT destination of a redirected connection
// (SO_ORIGINAL_DST), which is the remote address the caller's socket holds.
func originalDst(tc *net.TCPConn) (netip.AddrPort, bool) { return origdst.Get(tc) }

// --- Unix sockets ------------------------------------------------------------

// attestUnix uses SO_PEERCRED: the connecting process's pid and its effective
// uid and gid at connect time. Where the kernel has SO_PEERPIDFD (Linux 6.5)
// a pidfd pins that very process, and it must still be alive after its
// details are read, so its pid cannot have been reused; on older kernels
// only the start-time check guards the read itself.
func (p *Process) attestUnix(_ context.Context, uc *net.UnixConn) (broker.Identity, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return broker.Identity{}, fmt.Errorf("attest: process: %w", err)
	}
	var (
		cred           *unix.Ucred
		credErr, pfErr error
		pidfd          = -1
	)
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil {
			pidfd, pfErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		}
	}); err != nil {
		return broker.Identity{}, fmt.Errorf("attest: process: %w", err)
	}
	if credErr != nil {
		return broker.Identity{}, fmt.Errorf("attest: process: SO_PEERCRED: %w", credErr)
	}
	switch {
	case pfErr == nil:
		defer unix.Close(pidfd)
	case errors.Is(pfErr, unix.ENOPROTOOPT):
		pidfd = -1 // kernel before 6.5
	case errors.Is(pfErr, unix.ESRCH), errors.Is(pfErr, unix.EINVAL):
		return broker.Identity{}, processInvalid("unix socket peer %d has exited", cred.Pid)
	default:
		return broker.Identity{}, fmt.Errorf("attest: process: SO_PEERPIDFD: %w", pfErr)
	}
	pid := int(cred.Pid)
	if pid <= 0 {
		return broker.Identity{}, processInvalid("local peer not found: unix socket peer has no pid in this pid namespace")
	}
	info, pod, _, err := p.inspect(pid, 0, func() error {
		if pidfd < 0 {
			return nil
		}
		err := unix.PidfdSendSignal(pidfd, 0, nil, 0)
		if errors.Is(err, unix.ESRCH) {
			return processInvalid("unix socket peer %d has exited", pid)
		}
		if err != nil {
			return fmt.Errorf("attest: process: pidfd: %w", err)
		}
		return nil
	})
	if err != nil {
		return broker.Identity{}, err
	}
	if info.UID != int(cred.Uid) {
		return broker.Identity{}, processInvalid("peer uid %d differs from process %d's effective uid %d", cred.Uid, pid, info.UID)
	}
	return processIdentity(info, pod), nil
}

// --- inode → pid -------------------------------------------------------------

// findOwner finds a process holding the socket: the cached owner, then the
// recently attested pids, then processes whose /proc/<pid> is owned by the
// socket's uid (newest first), then root-owned ones (a non-dumpable process's
// /proc/<pid> shows as root). Other users' processes are not searched: their
// effective uid differs from the socket's, so they would be rejected anyway.
func (p *Process) findOwner(ctx context.Context, s peerSocket, useCache bool) (ownerEntry, error) {
	target := socketLinkName(s.inode)
	if useCache {
		if e, ok := p.owners.get(s.inode); ok {
			if p.clock.Now().Before(e.expires) {
				if fd, ok := p.holdsSocket(e.pid, e.fd, target); ok {
					e.fd = fd
					return e, nil
				}
			}
			p.owners.remove(s.inode)
		}
	}
	tried := map[int]bool{}
	denied := 0
	try := func(pid int) (ownerEntry, bool) {
		if tried[pid] {
			return ownerEntry{}, false
		}
		tried[pid] = true
		fd, ok, err := p.scanFDs(pid, target)
		if errors.Is(err, fs.ErrPermission) {
			denied++
		}
		return ownerEntry{pid: pid, fd: fd}, ok
	}
	for _, pid := range p.recentPIDs() {
		if e, ok := try(pid); ok {
			return e, nil
		}
	}

	d, err := os.Open(p.procRoot)
	if err != nil {
		return ownerEntry{}, fmt.Errorf("attest: process: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return ownerEntry{}, fmt.Errorf("attest: process: listing %s: %w", p.procRoot, err)
	}
	dfd := int(d.Fd())
	var mine, rootOwned []int
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 || tried[pid] {
			continue
		}
		var st unix.Stat_t
		if unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
			continue
		}
		switch st.Uid {
		case s.uid:
			mine = append(mine, pid)
		case 0:
			rootOwned = append(rootOwned, pid)
		}
	}
	// Newest first: a caller is more often a recent process than init.
	slices.Sort(mine)
	slices.Reverse(mine)
	slices.Sort(rootOwned)
	slices.Reverse(rootOwned)
	for i, pid := range append(mine, rootOwned...) {
		if i%64 == 0 {
			if err := ctx.Err(); err != nil {
				return ownerEntry{}, err
			}
		}
		if e, ok := try(pid); ok {
			return e, nil
		}
	}
	if denied > 0 {
		return ownerEntry{}, fmt.Errorf("attest: process: owner of socket inode %d not found; %d fd tables were not readable (the broker needs CAP_SYS_PTRACE to attest other users' processes)", s.inode, denied)
	}
	return ownerEntry{}, processInvalid("local peer not found: socket inode %d (uid %d) is held by no process visible here (another pid namespace?)", s.inode, s.uid)
}

// holdsSocket reports whether pid still has the socket open, at fd if it is
// still there, else anywhere in its fd table.
func (p *Process) holdsSocket(pid, fd int, target string) (int, bool) {
	var buf [64]byte
	if n, err := unix.Readlink(p.procRoot+"/"+strconv.Itoa(pid)+"/fd/"+strconv.Itoa(fd), buf[:]); err == nil && string(buf[:n]) == target {
		return fd, true
	}
	fd, ok, _ := p.scanFDs(pid, target)
	return fd, ok
}

// scanFDs searches one process's fd table: one readlink per descriptor.
func (p *Process) scanFDs(pid int, target string) (int, bool, error) {
	d, err := os.Open(p.procRoot + "/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return 0, false, err
	}
	defer d.Close()
	var buf [64]byte
	var dfd int
	haveFD := false
	for {
		names, err := d.Readdirnames(256)
		if !haveFD {
			dfd, haveFD = int(d.Fd()), true
		}
		for _, name := range names {
			n, lerr := unix.Readlinkat(dfd, name, buf[:])
			if lerr == nil && string(buf[:n]) == target {
				fd, cerr := strconv.Atoi(name)
				if cerr == nil {
					return fd, true, nil
				}
			}
		}
		if err != nil {
			if err == io.EOF {
				return 0, false, nil
			}
			return 0, false, err
		}
	}
}

func (p *Process) noteRecent(pid int) {
	p.recentMu.Lock()
	defer p.recentMu.Unlock()
	if i := slices.Index(p.recent, pid); i >= 0 {
		p.recent = slices.Delete(p.recent, i, i+1)
	}
	p.recent = slices.Insert(p.recent, 0, pid)
	if len(p.recent) > recentOwners {
		p.recent = p.recent[:recentOwners]
	}
}

func (p *Process) recentPIDs() []int {
	p.recentMu.Lock()
	defer p.recentMu.Unlock()
	return slices.Clone(p.recent)
}

// --- process details ---------------------------------------------------------

// inspect reads pid's details inside a pid-reuse window: the start time is
// read first, then status, exe link, executable hash and cgroup, then verify
// (does pid still hold the connection / is the connecting process alive), then
// the start time and exe link again. A different start time means the pid now
// names another process; a different exe link means it exec'd meanwhile.
// wantStart, when not zero, is the start time the caller expects (a cached
// owner); a mismatch returns errStaleOwner.
func (p *Process) inspect(pid int, wantStart uint64, verify func() error) (*broker.ProcessInfo, string, uint64, error) {
	dir := p.procRoot + "/" + strconv.Itoa(pid)
	start, err := p.readStart(dir, pid)
	if err != nil {
		return nil, "", 0, err
	}
	if wantStart != 0 && start != wantStart {
		return nil, "", 0, errStaleOwner
	}
	var buf [4096]byte
	status, err := readProcFile(dir+"/status", buf[:])
	if err != nil {
		return nil, "", 0, procErr(pid, err)
	}
	uid, gid, err := parseStatusIDs(status)
	if err != nil {
		return nil, "", 0, fmt.Errorf("attest: process: pid %d: %w", pid, err)
	}
	exe, err := os.Readlink(dir + "/exe")
	if err != nil {
		return nil, "", 0, procErr(pid, err)
	}
	sum, err := p.exeHash(dir + "/exe")
	if err != nil {
		return nil, "", 0, procErr(pid, err)
	}
	cg, err := readProcFile(dir+"/cgroup", buf[:])
	if err != nil {
		return nil, "", 0, procErr(pid, err)
	}
	containerID, podUID := parseCgroup(cg)
	if err := verify(); err != nil {
		return nil, "", 0, err
	}
	after, err := p.readStart(dir, pid)
	if err != nil {
		return nil, "", 0, err
	}
	if after != start {
		return nil, "", 0, processInvalid("pid %d was reused during attestation (start time %d, now %d)", pid, start, after)
	}
	if exe2, err := os.Readlink(dir + "/exe"); err != nil {
		return nil, "", 0, procErr(pid, err)
	} else if exe2 != exe {
		return nil, "", 0, processInvalid("process %d executed another program during attestation", pid)
	}
	return &broker.ProcessInfo{
		PID: pid, UID: uid, GID: gid,
		Exe: exe, SHA256: sum, ContainerID: containerID,
	}, podUID, start, nil
}

func (p *Process) readStart(dir string, pid int) (uint64, error) {
	var buf [1024]byte
	b, err := readProcFile(dir+"/stat", buf[:])
	if err != nil {
		return 0, procErr(pid, err)
	}
	st, err := parseStatStartTime(b)
	if err != nil {
		return 0, fmt.Errorf("attest: process: pid %d: %w", pid, err)
	}
	return st, nil
}

// procErr classifies a /proc read failure: a vanished process is rejected
// evidence; a permission problem is the broker's own misconfiguration.
func procErr(pid int, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, unix.ESRCH):
		return processInvalid("process %d exited during attestation", pid)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("attest: process: reading process %d: %w (the broker needs CAP_SYS_PTRACE to attest other users' processes)", pid, err)
	}
	return fmt.Errorf("attest: process: reading process %d: %w", pid, err)
}

// exeHash returns the hex SHA-256 of the file at path (a /proc/<pid>/exe
// link, which opens the very file the process executes), cached by device,
// inode, size, mtime and ctime. A file that changes while being hashed is an
// error and is not cached.
func (p *Process) exeHash(path string) (string, error) {
	fd, err := openRetry(path)
	if err != nil {
		return "", err
	}
	f := os.NewFile(uintptr(fd), path) // owns fd from here on
	defer f.Close()
	key, err := exeKeyOf(fd)
	if err != nil {
		return "", err
	}
	if sum, ok := p.hashes.get(key); ok {
		return sum, nil
	}
	v, err, _ := p.hashGroup.Do(fmt.Sprint(key), func() (any, error) {
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return "", err
		}
		after, err := exeKeyOf(fd)
		if err != nil {
			return "", err
		}
		if after != key {
			return "", errors.New("executable changed while it was hashed")
		}
		sum := hex.EncodeToString(h.Sum(nil))
		p.hashes.put(key, sum)
		return sum, nil
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

func exeKeyOf(fd int) (exeKey, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return exeKey{}, err
	}
	return exeKey{
		dev: uint64(st.Dev), ino: uint64(st.Ino), size: uint64(st.Size),
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(),
	}, nil
}

func openRetry(path string) (int, error) {
	for {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, &fs.PathError{Op: "open", Path: path, Err: err}
		}
		return fd, nil
	}
}

// readProcFile reads a small /proc file into buf (growing it if needed) with
// plain syscalls: no poller registration, no fstat, a fraction of
// os.ReadFile's cost on the hot path.
func readProcFile(path string, buf []byte) ([]byte, error) {
	fd, err := openRetry(path)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	n := 0
	for {
		if n == len(buf) {
			buf = append(buf, make([]byte, len(buf)+1)...)
		}
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}
