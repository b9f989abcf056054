package testservers

import (
	"net"
	"net/http"
	"os"
	"os/exec"
	"testing"
	"time"
)

// startLogged starts cmd with its output appended to logFile and returns a
// channel closed when it exits.
func startLogged(t testing.TB, what string, cmd *exec.Cmd, logFile string) <-chan struct{} {
	t.Helper()
	logf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting %s: %v", what, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	return done
}

// waitHTTP polls url until it answers 200, the process exits (done), or 60
// seconds pass; the last two fail the test with the server's log.
func waitHTTP(t testing.TB, what string, client *http.Client, url string, done <-chan struct{}, logFile string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-done:
			log, _ := os.ReadFile(logFile)
			t.Fatalf("%s exited during start; log:\n%s", what, log)
		case <-time.After(50 * time.Millisecond):
		}
	}
	log, _ := os.ReadFile(logFile)
	t.Fatalf("%s did not become ready within 60s; log:\n%s", what, log)
}

// kill ends a started server (SIGKILL), waits for it to exit (done) and
// for addr to refuse connections, so a restart can bind it again.
func kill(cmd *exec.Cmd, done <-chan struct{}, addr string) {
	_ = cmd.Process.Kill()
	<-done
	for i := 0; i < 100; i++ {
		c, err := net.DialTimeout("tcp", addr, 50*time.Millisecond)
		if err != nil {
			return
		}
		c.Close()
		time.Sleep(50 * time.Millisecond)
	}
}
