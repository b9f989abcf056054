//go:build linux

package canarytest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// drainWait bounds how long stop waits for a child process that still
// holds the capture pipe (a server a test forgot to stop).
const drainWait = 5 * time.Second

// capture points fds 1 and 2 at pipes; a goroutine per pipe forwards every
// byte unchanged to the original descriptor and streams it to the
// registry.
type capture struct {
	fds []capturedFD
	wg  sync.WaitGroup
}

type capturedFD struct {
	fd   int
	orig *os.File // a dup of the original descriptor
	r    *os.File // read end of the pipe now behind fd
}

func startCapture(reg *Registry) (*capture, error) {
	c := &capture{}
	for _, t := range []struct {
		fd   int
		name string
	}{{1, "stdout"}, {2, "stderr"}} {
		origFD, err := unix.FcntlInt(uintptr(t.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			c.stop()
			return nil, fmt.Errorf("dup fd %d: %w", t.fd, err)
		}
		orig := os.NewFile(uintptr(origFD), "original "+t.name)
		r, w, err := os.Pipe()
		if err != nil {
			orig.Close()
			c.stop()
			return nil, err
		}
		// dup3 without O_CLOEXEC: child processes that inherit fd 1 or 2
		// write into the capture too.
		if err := unix.Dup3(int(w.Fd()), t.fd, 0); err != nil {
			orig.Close()
			r.Close()
			w.Close()
			c.stop()
			return nil, fmt.Errorf("dup3 onto fd %d: %w", t.fd, err)
		}
		w.Close()
		c.fds = append(c.fds, capturedFD{fd: t.fd, orig: orig, r: r})
		c.wg.Add(1)
		go c.forward(r, orig, reg.Writer(t.name))
	}
	// An unhandled panic or fatal error (a test timeout among them) ends
	// the process before the forwarders could copy it: send it to the real
	// stderr as well.
	if len(c.fds) == 2 {
		_ = debug.SetCrashOutput(c.fds[1].orig, debug.CrashOptions{})
	}
	return c, nil
}

// forward copies the pipe to the original descriptor and the registry.
// Its name is ForwarderFunc.
func (c *capture) forward(r io.Reader, orig io.Writer, reg io.Writer) {
	defer c.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_, _ = orig.Write(buf[:n])
			_, _ = reg.Write(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// stop puts the original descriptors back and waits until everything
// written to the pipes has been forwarded (or drainWait passes, when a
// child process still holds a pipe open).
func (c *capture) stop() {
	_ = debug.SetCrashOutput(nil, debug.CrashOptions{})
	var errs []error
	for _, f := range c.fds {
		if err := unix.Dup3(int(f.orig.Fd()), f.fd, 0); err != nil {
			errs = append(errs, err)
		}
		_ = f.r.SetReadDeadline(time.Now().Add(drainWait))
	}
	c.wg.Wait()
	for _, f := range c.fds {
		f.r.Close()
		f.orig.Close()
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(os.Stderr, "canarytest: restoring stdout/stderr: %v\n", err)
	}
}
