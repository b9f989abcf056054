package integration

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
)

// Transparent mode end to end, as root: a "pod" network namespace joined
// to this (the test's) namespace by a veth pair. Inside the pod, the
// project's own deploy/keygate-iptables installs the redirect (nft, then
// iptables), the real broker runs as its own uid and a real curl runs as an
// application uid, with no proxy variable: its outbound TCP is redirected
// to the broker, which recovers the original destination, attests curl by
// its process (same network namespace), decides and injects. The upstreams
// listen on this namespace's side of the veth.
//
// Names resolve through `ip netns exec`'s own override: /etc/netns/NAME/hosts
// is bind-mounted over /etc/hosts for everything run in that namespace.

const (
	transparentBrokerUID = 64231
	transparentAppUID    = 64232
	transparentPort      = 15001
)

type netnsWorld struct {
	t         *testing.T
	ns        string // pod namespace
	podIP     string // pod side of the veth
	hostIP    string // this namespace's side: the upstreams
	evilIP    string // a second address on this side
	hostIP6   string // this side's IPv6 address
	hostsFile string
	script    string
	setpriv   string
	curl      string
	pub       string // world-readable dir for the broker binary, CA and config
}

func requireNetnsTools(t *testing.T) (setpriv, curl string) {
	t.Helper()
	requireRoot(t)
	for _, tool := range []string{"ip", "nft", "iptables"} {
		requireTool(t, tool)
	}
	return requireTool(t, "setpriv"), requireTool(t, "curl")
}

func newNetnsWorld(t *testing.T) *netnsWorld {
	t.Helper()
	setpriv, curl := requireNetnsTools(t)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	// 10.231.N.0/24 with N from the random id keeps parallel runs apart.
	n := int(b[0])
	w := &netnsWorld{t: t, ns: "kgt" + id, podIP: fmt.Sprintf("10.231.%d.1", n), hostIP: fmt.Sprintf("10.231.%d.2", n),
		evilIP: fmt.Sprintf("10.231.%d.3", n), hostIP6: fmt.Sprintf("fd00:231:%x::2", n), setpriv: setpriv, curl: curl,
		script: filepath.Join(moduleRoot, "deploy", "keygate-iptables")}
	if _, err := os.Stat(w.script); err != nil {
		t.Fatalf("deploy/keygate-iptables: %v", err)
	}
	hostVeth, podVeth := "kgh"+id, "kgp"+id
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", w.ns)
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", hostVeth).Run()
		_ = exec.Command("ip", "netns", "del", w.ns).Run()
		_ = os.RemoveAll(filepath.Join("/etc/netns", w.ns))
	})
	run("ip", "link", "add", hostVeth, "type", "veth", "peer", "name", podVeth)
	run("ip", "link", "set", podVeth, "netns", w.ns)
	run("ip", "addr", "add", w.hostIP+"/24", "dev", hostVeth)
	run("ip", "addr", "add", w.evilIP+"/24", "dev", hostVeth)
	run("ip", "addr", "add", w.hostIP6+"/64", "dev", hostVeth, "nodad")
	run("ip", "link", "set", hostVeth, "up")
	run("ip", "netns", "exec", w.ns, "ip", "addr", "add", w.podIP+"/24", "dev", podVeth)
	run("ip", "netns", "exec", w.ns, "ip", "addr", "add", strings.TrimSuffix(w.hostIP6, "2")+"1/64", "dev", podVeth, "nodad")
	run("ip", "netns", "exec", w.ns, "ip", "link", "set", podVeth, "up")
	run("ip", "netns", "exec", w.ns, "ip", "link", "set", "lo", "up")
	etc := filepath.Join("/etc/netns", w.ns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	w.hostsFile = filepath.Join(etc, "hosts")
	hosts := fmt.Sprintf("127.0.0.1 localhost\n%s allowed.test evil.test loop.test\n", w.hostIP)
	if err := os.WriteFile(w.hostsFile, []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	w.pub = publicDir(t)
	return w
}

// redirect installs the pod's redirect with the project's script.
func (w *netnsWorld) redirect(backend string, exemptUID int) {
	w.t.Helper()
	args := []string{"netns", "exec", w.ns, w.script, "--backend", backend, "--to-port", strconv.Itoa(transparentPort),
		"--exempt-uid", strconv.Itoa(exemptUID), "--ports", "80,443"}
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		w.t.Fatalf("keygate-iptables: %v\n%s", err, out)
	}
}

// curlAs runs curl in the pod as the application uid; no proxy variable.
func (w *netnsWorld) curlAs(args ...string) (status int, headers, body string, err error) {
	full := append([]string{"netns", "exec", w.ns, w.setpriv, "--reuid=" + strconv.Itoa(transparentAppUID),
		"--regid=" + strconv.Itoa(transparentAppUID), "--clear-groups", w.curl, "-sS", "--max-time", "10",
		"-D", "-", "-o", "-", "-w", "\n%{http_code}"}, args...)
	cmd := exec.Command("ip", full...)
	cmd.Env = cleanEnv(w.pub)
	out, err := cmd.CombinedOutput()
	s := string(out)
	i := strings.LastIndex(s, "\n")
	if i < 0 {
		return 0, "", s, err
	}
	status, _ = strconv.Atoi(strings.TrimSpace(s[i+1:]))
	head, body, _ := strings.Cut(s[:i], "\r\n\r\n")
	return status, head, body, err
}

const transparentConfig = `
listen:
  proxy: 127.0.0.1:0
  transparent: "[::]:{{index .Ports "transparent"}}"
  admin: "{{index .Ports "podip"}}"
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: process}
egress:
  allow_cidrs: ["{{index .Ports "cidr"}}"]
  ca_bundle: "{{.Bundle}}"
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: app-calls-allowed
    hosts: [allowed.test, loop.test]
    ports: [443, 80]
    when: 'workload.method == "process" && workload.process.uid == {{index .Ports "appuid"}}'
    inject: {credential: api-token, as: bearer}
    allow_plaintext: true
`

func TestTransparentNetns(t *testing.T) {
	for _, backend := range []string{"nft", "iptables"} {
		t.Run(backend, func(t *testing.T) { testTransparentBackend(t, backend) })
	}
}

func testTransparentBackend(t *testing.T, backend string) {
	w := newNetnsWorld(t)
	h := newHarness(t)
	allowedTLS := upstreamAt(t, "allowed", w.hostIP+":443", false, nil)
	allowedPlain := upstreamAt(t, "allowed-plain", w.hostIP+":80", true, nil)
	var evilConns atomic.Int64
	evil, err := net.Listen("tcp", w.evilIP+":443")
	if err != nil {
		t.Fatal(err)
	}
	defer evil.Close()
	go func() {
		for {
			c, err := evil.Accept()
			if err != nil {
				return
			}
			evilConns.Add(1)
			c.Close()
		}
	}()

	// Files the broker's uid must read.
	caCert := copyPublic(t, h.caPEM(), w.pub)
	caKey := filepath.Join(w.pub, "ca-key.pem")
	key, err := os.ReadFile(filepath.Join(h.caDir, "ca-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caKey, key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(caKey, transparentBrokerUID, transparentBrokerUID); err != nil {
		t.Fatal(err)
	}
	bin := copyPublic(t, brokerBin, w.pub)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	bundle := copyPublic(t, upstreamBundle, w.pub)
	cfg := strings.NewReplacer(
		`{{index .Ports "transparent"}}`, strconv.Itoa(transparentPort),
		`{{index .Ports "podip"}}`, w.podIP+":15090",
		`{{index .Ports "cidr"}}`, w.hostIP[:strings.LastIndex(w.hostIP, ".")]+".0/24",
		`{{index .Ports "appuid"}}`, strconv.Itoa(transparentAppUID),
		`{{.CACert}}`, caCert, `{{.CAKey}}`, caKey, `{{.Bundle}}`, bundle,
	).Replace(transparentConfig)
	cfgPath := filepath.Join(w.pub, "broker.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	w.redirect(backend, transparentBrokerUID)
	// The broker runs as its own uid, keeping only the capabilities the
	// process attestor needs to read another uid's /proc entries.
	caps := "+sys_ptrace,+dac_read_search"
	b := h.launch(brokerSpec{name: "transparent-" + backend, env: []string{"KG_E2E_TOKEN=" + h.canary},
		command: []string{"ip", "netns", "exec", w.ns, w.setpriv,
			"--reuid=" + strconv.Itoa(transparentBrokerUID), "--regid=" + strconv.Itoa(transparentBrokerUID), "--clear-groups",
			"--inh-caps=" + caps, "--ambient-caps=" + caps, bin, "run", "--config", cfgPath}},
		nil, "", w.podIP+":15090", nil)
	if err := b.waitHealthy(testTimeout); err != nil {
		t.Fatalf("broker: %v\n%s", err, redactCanary(string(b.output())))
	}
	caFile := caCert

	t.Run("the broker process is hardened", func(t *testing.T) {
		// RLIMIT_CORE 0, and not dumpable: the kernel then owns the
		// process's /proc entries by root although it runs as its own uid.
		pid := strconv.Itoa(b.cmd.Process.Pid)
		limits, err := os.ReadFile("/proc/" + pid + "/limits")
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`(?m)^Max core file size\s+0\s+0\s`).Match(limits) {
			t.Fatalf("core dumps are not disabled:\n%s", limits)
		}
		fi, err := os.Stat("/proc/" + pid + "/mem")
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 {
			t.Fatalf("/proc/%s/mem is owned by uid %d: the broker (uid %d) is still dumpable", pid, st.Uid, transparentBrokerUID)
		}
	})

	t.Run("https is intercepted and injected", func(t *testing.T) {
		status, head, body, err := w.curlAs("--cacert", caFile, "-H", "Authorization: Bearer workload-own", "https://allowed.test/v1/repos")
		if err != nil || status != http.StatusOK || !strings.Contains(body, "hello from allowed") {
			t.Fatalf("curl: status %d err %v\n%s\n%s", status, err, head, body)
		}
		allowedTLS.expectInjected(t, 1, h.bearer())
		line := b.auditLine(t, headerValue(head, "X-Keygate-Request-Id"))
		if line["listener"] != "transparent" || line["workload.method"] != "process" || line["rule"] != "app-calls-allowed" {
			t.Fatalf("audit line = %v", line)
		}
	})
	t.Run("plain http is injected per rule", func(t *testing.T) {
		status, head, body, err := w.curlAs("http://allowed.test/plain")
		if err != nil || status != http.StatusOK {
			t.Fatalf("curl: status %d err %v\n%s\n%s", status, err, head, body)
		}
		allowedPlain.expectInjected(t, 1, h.bearer())
	})
	t.Run("a denied destination gets nothing", func(t *testing.T) {
		before := allowedTLS.conns.Load()
		status, _, _, err := w.curlAs("--cacert", caFile, "https://evil.test/steal")
		if err == nil && status == http.StatusOK {
			t.Fatal("curl to evil.test succeeded")
		}
		if allowedTLS.conns.Load() != before {
			t.Fatal("the upstream address received a connection for a denied name")
		}
	})
	t.Run("SNI for the allowed name aimed at another address", func(t *testing.T) {
		status, _, body, err := w.curlAs("--cacert", caFile, "--resolve", "allowed.test:443:"+w.evilIP, "https://allowed.test/aimed")
		if err != nil || status != http.StatusOK || !strings.Contains(body, "hello from allowed") {
			t.Fatalf("curl: status %d err %v %s", status, err, body)
		}
		if n := evilConns.Load(); n != 0 {
			t.Fatalf("the other address received %d connections", n)
		}
		allowedTLS.expectInjected(t, 2, h.bearer())
	})
	t.Run("IPv6: the original destination is recovered too", func(t *testing.T) {
		var v6Conns atomic.Int64
		ln, err := net.Listen("tcp", "["+w.hostIP6+"]:443")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				v6Conns.Add(1)
				c.Close()
			}
		}()
		// curl aims at the IPv6 address with SNI allowed.test: redirected,
		// recovered with IP6T_SO_ORIGINAL_DST, and sent to allowed.test.
		status, head, body, err := w.curlAs("--cacert", caFile, "--resolve", "allowed.test:443:["+w.hostIP6+"]", "https://allowed.test/v6")
		if err != nil || status != http.StatusOK || !strings.Contains(body, "hello from allowed") {
			t.Fatalf("curl: status %d err %v\n%s\n%s", status, err, head, body)
		}
		if v6Conns.Load() != 0 {
			t.Fatal("the IPv6 address received a connection; the broker must dial the name")
		}
		allowedTLS.expectInjected(t, 3, h.bearer())
		line := b.auditLine(t, headerValue(head, "X-Keygate-Request-Id"))
		if line["listener"] != "transparent" || line["workload.method"] != "process" {
			t.Fatalf("audit line = %v", line)
		}
	})
	t.Run("without the exemption the loop is detected", func(t *testing.T) {
		w.redirect(backend, 1) // the same rules, exempting another uid
		defer w.redirect(backend, transparentBrokerUID)
		// A name the broker has no pooled upstream connection for, so it
		// must dial, and its dial is redirected back to itself.
		status, head, _, _ := w.curlAs("--cacert", caFile, "--resolve", "loop.test:443:"+w.hostIP, "https://loop.test/loop")
		if status != http.StatusLoopDetected || headerValue(head, "X-Keygate-Error") != "loop_detected" {
			t.Fatalf("status %d\n%s; want 508 loop_detected", status, head)
		}
		if fds := countFDs(t, b); fds > 200 {
			t.Fatalf("the broker holds %d file descriptors after a loop", fds)
		}
		allowedTLS.expectInjected(t, 3, h.bearer())
	})
}

func headerValue(head, name string) string {
	for _, l := range strings.Split(head, "\r\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// countFDs counts the broker's open descriptors (`ip netns exec` and
// setpriv exec the broker in place, so the pid is the broker's).
func countFDs(t *testing.T, b *brokerProc) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(b.cmd.Process.Pid) + "/fd")
	if err != nil {
		t.Fatalf("reading the broker's fds: %v", err)
	}
	return len(ents)
}
