// Package kubernetes holds the tests of keygate's Kubernetes manifests
// (kustomize base and overlays in this directory). It is its own Go module,
// so the Kubernetes and kustomize libraries stay out of the broker's
// go.mod; `make test` runs it (cd deploy/kubernetes && go test ./...).
//
// What the tests prove, for every overlay rendered with the kustomize API
// (what `kubectl apply -k` does):
//
//   - every object decodes strictly into its k8s.io/api type: an unknown
//     or misspelt field is an error, so a typo fails CI instead of being
//     dropped silently by the API server;
//   - references inside the objects resolve: volume mounts, probe ports,
//     ConfigMaps, service accounts, selectors;
//   - the security settings: every container non-root (except the redirect
//     init container, which must be root to hold NET_ADMIN and has nothing
//     else), read-only root filesystem, no privilege escalation, all
//     capabilities dropped, seccomp RuntimeDefault, resources bounded;
//   - the redirect agrees with the broker: the init container's exempt uid
//     is the broker's runAsUser, which is the Dockerfile's USER and the
//     script's default; its port is listen.transparent's; its settings pass
//     the script's own validation (--dry-run);
//   - the broker config in each ConfigMap passes `broker validate` (the
//     broker built from the parent module), the DaemonSet's after its
//     prepare step has rendered it, exactly as that step runs in the pod.
package kubernetes

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// Every kustomization a user may apply.
var kustomizations = []string{
	"base",
	"overlays/sidecar",
	"overlays/sidecar-hostpath-spire",
	"overlays/daemonset",
}

const (
	brokerUID       = 65532 // Dockerfile USER of the broker stage
	redirectInit    = "keygate-iptables"
	brokerContainer = "keygate"
	scriptPath      = "../keygate-iptables"
	dockerfilePath  = "../../Dockerfile"
)

// Objects users create themselves (docs/kubernetes.md): referenced by the
// manifests, never generated, so no credential or key lives in git.
var userCreated = map[string]bool{
	"Secret/keygate-system/keygate-ca":            true,
	"Secret/keygate-system/keygate-credentials":   true,
	"Secret/keygate-demo/keygate-credentials":     true,
	"ConfigMap/keygate-demo-node/keygate-ca-cert": true,
}

// object is one rendered resource, decoded into its k8s.io/api type.
type object struct {
	kind, namespace, name string
	raw                   []byte
	obj                   any
}

func (o object) key() string { return o.kind + "/" + o.namespace + "/" + o.name }

// newTyped returns an empty value of the k8s.io/api type for apiVersion/kind.
func newTyped(apiVersion, kind string) (any, bool) {
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		return &corev1.Namespace{}, true
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1/Secret":
		return &corev1.Secret{}, true
	case "v1/Service":
		return &corev1.Service{}, true
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, true
	case "apps/v1/DaemonSet":
		return &appsv1.DaemonSet{}, true
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, true
	}
	return nil, false
}

// decodeStrict decodes one YAML object into its type; unknown and
// duplicate fields are errors.
func decodeStrict(raw []byte) (object, error) {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(raw, &head); err != nil {
		return object{}, err
	}
	typed, ok := newTyped(head.APIVersion, head.Kind)
	if !ok {
		return object{}, fmt.Errorf("%s %s/%s: no k8s.io/api type registered in this test (add it to newTyped)", head.APIVersion, head.Kind, head.Metadata.Name)
	}
	// As the API server's strict field validation does: YAML with no
	// duplicate keys, then JSON decoded case-sensitively (encoding/json
	// would accept "readOnlyRootFileSystem" for readOnlyRootFilesystem)
	// with unknown and duplicate fields as errors.
	j, err := yaml.YAMLToJSONStrict(raw)
	if err != nil {
		return object{}, fmt.Errorf("%s %s: %w", head.Kind, head.Metadata.Name, err)
	}
	strict, err := kjson.UnmarshalStrict(j, typed, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return object{}, fmt.Errorf("%s %s: %w", head.Kind, head.Metadata.Name, err)
	}
	if len(strict) > 0 {
		return object{}, fmt.Errorf("%s %s: %w", head.Kind, head.Metadata.Name, errors.Join(strict...))
	}
	return object{kind: head.Kind, namespace: head.Metadata.Namespace, name: head.Metadata.Name, raw: raw, obj: typed}, nil
}

var (
	renderMu    sync.Mutex
	renderCache = map[string][]object{}
)

// render builds a kustomization with the kustomize API and decodes every
// object strictly.
func render(t *testing.T, dir string) []object {
	t.Helper()
	renderMu.Lock()
	defer renderMu.Unlock()
	if objs, ok := renderCache[dir]; ok {
		return objs
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		t.Fatal(err)
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), abs)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var objs []object
	for _, r := range rm.Resources() {
		raw, err := r.AsYAML()
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		o, err := decodeStrict(raw)
		if err != nil {
			t.Fatalf("%s: %v\n%s", dir, err, raw)
		}
		objs = append(objs, o)
	}
	if len(objs) == 0 {
		t.Fatalf("%s renders nothing", dir)
	}
	renderCache[dir] = objs
	return objs
}

// pod is a pod template with where it came from.
type pod struct {
	owner     string
	namespace string
	selector  map[string]string
	spec      *corev1.PodTemplateSpec
}

func pods(objs []object) []pod {
	var out []pod
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *appsv1.Deployment:
			out = append(out, pod{o.key(), o.namespace, v.Spec.Selector.MatchLabels, &v.Spec.Template})
		case *appsv1.DaemonSet:
			out = append(out, pod{o.key(), o.namespace, v.Spec.Selector.MatchLabels, &v.Spec.Template})
		}
	}
	return out
}

func allContainers(p *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for i := range p.InitContainers {
		out = append(out, &p.InitContainers[i])
	}
	for i := range p.Containers {
		out = append(out, &p.Containers[i])
	}
	return out
}

func find[T any](objs []object, kind, namespace, name string) (T, bool) {
	var zero T
	for _, o := range objs {
		if o.kind == kind && o.namespace == namespace && o.name == name {
			v, ok := o.obj.(T)
			return v, ok
		}
	}
	return zero, false
}

// ---------------------------------------------------------------------------

// TestStrictDecoding renders every kustomization; render fails the test on
// any object that does not decode strictly.
func TestStrictDecoding(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			seen := map[string]bool{}
			for _, o := range objs {
				if o.name == "" {
					t.Errorf("%s without a name", o.kind)
				}
				if o.kind != "Namespace" && o.namespace == "" {
					t.Errorf("%s has no namespace", o.key())
				}
				if seen[o.key()] {
					t.Errorf("%s rendered twice", o.key())
				}
				seen[o.key()] = true
			}
		})
	}
}

// TestStrictDecodingCatchesTypos proves the check bites: a misspelt field
// (valid YAML, wrong schema) must be an error, not dropped.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	objs := render(t, "overlays/sidecar")
	dep, ok := findRaw(objs, "Deployment", "example-app")
	if !ok {
		t.Fatal("no Deployment example-app")
	}
	for _, c := range []struct{ from, to string }{
		{"readOnlyRootFilesystem:", "readOnlyRootFileSystem:"},
		{"runAsNonRoot:", "runAsNonroot:"},
		{"allowPrivilegeEscalation:", "allowPrivilegedEscalation:"},
		{"mountPath:", "mountpath:"},
	} {
		bad := bytes.Replace(dep, []byte(c.from), []byte(c.to), 1)
		if bytes.Equal(bad, dep) {
			t.Fatalf("%s not in the Deployment", c.from)
		}
		if _, err := decodeStrict(bad); err == nil || !strings.Contains(err.Error(), "unknown field") {
			t.Errorf("%s -> %s: decoded without an unknown-field error (%v)", c.from, c.to, err)
		}
	}
	if _, err := decodeStrict(append(append([]byte{}, dep...), []byte("kind: Deployment\n")...)); err == nil {
		t.Error("a duplicate key decoded without error")
	}
}

func findRaw(objs []object, kind, name string) ([]byte, bool) {
	for _, o := range objs {
		if o.kind == kind && o.name == name {
			return o.raw, true
		}
	}
	return nil, false
}

// TestReferences: what the pods refer to exists.
func TestReferences(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			exists := map[string]bool{}
			for _, o := range objs {
				exists[o.key()] = true
			}
			for k := range userCreated {
				exists[k] = true
			}
			for _, p := range pods(objs) {
				spec := &p.spec.Spec
				if !labels.SelectorFromSet(p.selector).Matches(labels.Set(p.spec.Labels)) {
					t.Errorf("%s: selector %v does not match the template's labels %v", p.owner, p.selector, p.spec.Labels)
				}
				if sa := spec.ServiceAccountName; sa != "" && !exists["ServiceAccount/"+p.namespace+"/"+sa] {
					t.Errorf("%s: service account %s is not rendered", p.owner, sa)
				}
				volumes := map[string]bool{}
				for _, v := range spec.Volumes {
					volumes[v.Name] = true
					if v.ConfigMap != nil && !exists["ConfigMap/"+p.namespace+"/"+v.ConfigMap.Name] {
						t.Errorf("%s: volume %s: ConfigMap %s does not exist", p.owner, v.Name, v.ConfigMap.Name)
					}
					if v.Secret != nil && !exists["Secret/"+p.namespace+"/"+v.Secret.SecretName] {
						t.Errorf("%s: volume %s: Secret %s is neither rendered nor documented as user-created", p.owner, v.Name, v.Secret.SecretName)
					}
				}
				for _, c := range allContainers(spec) {
					for _, m := range c.VolumeMounts {
						if !volumes[m.Name] {
							t.Errorf("%s: container %s mounts the undefined volume %s", p.owner, c.Name, m.Name)
						}
					}
					ports := map[string]bool{}
					for _, cp := range c.Ports {
						ports[cp.Name] = true
					}
					for _, pr := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
						if pr != nil && pr.HTTPGet != nil && pr.HTTPGet.Port.StrVal != "" && !ports[pr.HTTPGet.Port.StrVal] {
							t.Errorf("%s: container %s probes the undefined port %q", p.owner, c.Name, pr.HTTPGet.Port.StrVal)
						}
					}
					for _, e := range c.Env {
						if r := e.ValueFrom; r != nil && r.SecretKeyRef != nil && !exists["Secret/"+p.namespace+"/"+r.SecretKeyRef.Name] {
							t.Errorf("%s: container %s: Secret %s is neither rendered nor documented as user-created", p.owner, c.Name, r.SecretKeyRef.Name)
						}
					}
				}
			}
			for _, o := range objs {
				np, ok := o.obj.(*networkingv1.NetworkPolicy)
				if !ok {
					continue
				}
				sel, err := metav1LabelSelector(np)
				if err != nil {
					t.Fatal(err)
				}
				matched := false
				for _, p := range pods(objs) {
					if p.namespace == o.namespace && sel.Matches(labels.Set(p.spec.Labels)) {
						matched = true
					}
				}
				if !matched {
					t.Errorf("%s selects no pod", o.key())
				}
			}
		})
	}
}

func metav1LabelSelector(np *networkingv1.NetworkPolicy) (labels.Selector, error) {
	if len(np.Spec.PodSelector.MatchExpressions) > 0 {
		return nil, fmt.Errorf("%s: match expressions not handled by this test", np.Name)
	}
	return labels.SelectorFromSet(np.Spec.PodSelector.MatchLabels), nil
}

// TestNetworkPolicies: every overlay ships one.
func TestNetworkPolicies(t *testing.T) {
	for _, dir := range kustomizations[1:] {
		n := 0
		for _, o := range render(t, dir) {
			if o.kind == "NetworkPolicy" {
				n++
			}
		}
		if n == 0 {
			t.Errorf("%s has no NetworkPolicy", dir)
		}
	}
}

// TestSecurityContexts checks every container of every pod.
func TestSecurityContexts(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			for _, p := range pods(render(t, dir)) {
				spec := &p.spec.Spec
				if spec.HostPID || spec.HostIPC {
					t.Errorf("%s: hostPID/hostIPC", p.owner)
				}
				if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
					t.Errorf("%s: automountServiceAccountToken is not false", p.owner)
				}
				for _, c := range allContainers(spec) {
					checkContainer(t, p, c)
				}
			}
		})
	}
}

func checkContainer(t *testing.T, p pod, c *corev1.Container) {
	t.Helper()
	where := p.owner + " container " + c.Name
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s: no securityContext", where)
		return
	}
	psc := p.spec.Spec.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	uid := sc.RunAsUser
	if uid == nil {
		uid = psc.RunAsUser
	}
	nonRoot := sc.RunAsNonRoot
	if nonRoot == nil {
		nonRoot = psc.RunAsNonRoot
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccomp profile is not RuntimeDefault", where)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem is not true", where)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation is not false", where)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: privileged", where)
	}
	if sc.ProcMount != nil && *sc.ProcMount != corev1.DefaultProcMount {
		t.Errorf("%s: procMount %s", where, *sc.ProcMount)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("%s: capabilities do not drop ALL", where)
	}
	var added []string
	if sc.Capabilities != nil {
		for _, a := range sc.Capabilities.Add {
			added = append(added, string(a))
		}
	}
	if c.Name == redirectInit {
		// Root, because only uid 0 keeps added capabilities across exec in
		// Kubernetes; and exactly what the backend needs (TestCapabilities
		// in deploy/iptables_test.go): NET_ADMIN, plus NET_RAW for
		// iptables-legacy only.
		if uid == nil || *uid != 0 {
			t.Errorf("%s: runAsUser is not 0 (added capabilities would be lost at exec)", where)
		}
		want := []string{"NET_ADMIN"}
		if envValue(c, "KEYGATE_BACKEND") == "iptables-legacy" {
			want = append(want, "NET_RAW")
		}
		if !slices.Equal(added, want) {
			t.Errorf("%s: adds capabilities %v, want exactly %v", where, added, want)
		}
		if !slices.ContainsFunc(p.spec.Spec.InitContainers, func(ic corev1.Container) bool { return ic.Name == c.Name }) {
			t.Errorf("%s: the redirect must be an init container", where)
		}
	} else {
		if nonRoot == nil || !*nonRoot {
			t.Errorf("%s: runAsNonRoot is not true", where)
		}
		if uid == nil || *uid == 0 {
			t.Errorf("%s: runAsUser is not set to a non-zero uid", where)
		}
		if len(added) > 0 {
			t.Errorf("%s: adds capabilities %v", where, added)
		}
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[r]; !ok {
			t.Errorf("%s: no %s request", where, r)
		}
		if _, ok := c.Resources.Limits[r]; !ok {
			t.Errorf("%s: no %s limit", where, r)
		}
	}
	for _, m := range c.VolumeMounts {
		for _, v := range p.spec.Spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil && !m.ReadOnly {
				t.Errorf("%s: hostPath volume %s mounted read-write", where, m.Name)
			}
		}
	}
}

func envValue(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

func hasEnv(c *corev1.Container, name string) bool {
	return slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == name })
}

// TestRedirectMatchesBroker: in each sidecar pod, the redirect exempts
// exactly the broker's uid, sends traffic to the broker's transparent port,
// and its settings pass the script's own validation.
func TestRedirectMatchesBroker(t *testing.T) {
	scriptVars := scriptEnvVars(t)
	scriptDefault := scriptDefaultUID(t)
	if scriptDefault != strconv.Itoa(brokerUID) {
		t.Errorf("keygate-iptables' default exempt uid is %s, want %d", scriptDefault, brokerUID)
	}
	sidecars := 0
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			for _, p := range pods(objs) {
				spec := &p.spec.Spec
				var init, broker *corev1.Container
				for _, c := range allContainers(spec) {
					switch c.Name {
					case redirectInit:
						init = c
					case brokerContainer:
						broker = c
					}
				}
				if broker == nil {
					continue
				}
				brokerUser := *broker.SecurityContext.RunAsUser
				if brokerUser != brokerUID || broker.SecurityContext.RunAsGroup == nil || *broker.SecurityContext.RunAsGroup != brokerUID {
					t.Errorf("%s: broker runs as %d:%v, want %d:%d (the image's USER)", p.owner, brokerUser, broker.SecurityContext.RunAsGroup, brokerUID, brokerUID)
				}
				cfg := brokerConfig(t, objs, p, broker)
				checkProbes(t, p, broker, cfg)
				if init == nil {
					if cfg.Listen.Transparent != "" {
						t.Errorf("%s: listen.transparent without a redirect init container", p.owner)
					}
					continue
				}
				sidecars++
				for _, e := range init.Env {
					if strings.HasPrefix(e.Name, "KEYGATE_") && !scriptVars[e.Name] {
						t.Errorf("%s: %s is not a variable keygate-iptables reads (typo?)", p.owner, e.Name)
					}
				}
				if init.Image != "keygate/iptables-init:latest" || len(init.Command) > 0 || len(init.Args) > 0 {
					t.Errorf("%s: the redirect container must run the iptables-init image's entrypoint (keygate-iptables), got %s %v %v", p.owner, init.Image, init.Command, init.Args)
				}
				exempt := splitList(envValue(init, "KEYGATE_EXEMPT_UIDS"))
				if !hasEnv(init, "KEYGATE_EXEMPT_UIDS") {
					exempt = []string{scriptDefault}
				}
				if !slices.Contains(exempt, strconv.FormatInt(brokerUser, 10)) {
					t.Errorf("%s: exempt uids %v do not include the broker's runAsUser %d: the broker's own connections would loop", p.owner, exempt, brokerUser)
				}
				for _, c := range spec.Containers {
					if c.Name == brokerContainer {
						continue
					}
					u := c.SecurityContext.RunAsUser
					if u == nil || *u == 0 || slices.Contains(exempt, strconv.FormatInt(*u, 10)) {
						t.Errorf("%s: app container %s runs as an exempt uid (%v): its traffic would bypass the broker", p.owner, c.Name, u)
					}
				}
				toPort := envValue(init, "KEYGATE_TO_PORT")
				if toPort == "" {
					toPort = "15001"
				}
				if _, port, err := net.SplitHostPort(cfg.Listen.Transparent); err != nil || port != toPort {
					t.Errorf("%s: redirect to port %s, but listen.transparent is %q", p.owner, toPort, cfg.Listen.Transparent)
				}
				if host, _, _ := net.SplitHostPort(cfg.Listen.Transparent); host != "" && host != "::" && host != "0.0.0.0" && host != "127.0.0.1" {
					t.Errorf("%s: listen.transparent %q does not cover loopback, where REDIRECT delivers", p.owner, cfg.Listen.Transparent)
				}
				// The broker must be listening before the app's first
				// connection: a native sidecar started after the redirect and
				// gated by a startup probe.
				idx := slices.IndexFunc(spec.InitContainers, func(c corev1.Container) bool { return c.Name == brokerContainer })
				redir := slices.IndexFunc(spec.InitContainers, func(c corev1.Container) bool { return c.Name == redirectInit })
				if idx < 0 || redir > idx || broker.RestartPolicy == nil || *broker.RestartPolicy != corev1.ContainerRestartPolicyAlways || broker.StartupProbe == nil {
					t.Errorf("%s: the broker must be a native sidecar (init container with restartPolicy Always and a startup probe) after %s", p.owner, redirectInit)
				}
				// The script accepts exactly these settings.
				dryRun(t, p.owner, init)
			}
		})
	}
	if sidecars == 0 {
		t.Error("no pod with a redirect init container was checked")
	}
}

func splitList(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
}

// dryRun runs deploy/keygate-iptables --dry-run with the container's
// environment: the script validates every value and needs no privilege.
func dryRun(t *testing.T, owner string, c *corev1.Container) {
	t.Helper()
	cmd := exec.Command("sh", scriptPath, "--dry-run")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYGATE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	for _, e := range c.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Errorf("%s: keygate-iptables --dry-run with the manifest's environment: %v\n%s", owner, err, stderr.String())
		return
	}
	if !bytes.Contains(out, []byte("redirect")) && !bytes.Contains(out, []byte("REDIRECT")) {
		t.Errorf("%s: the dry run installs no redirect:\n%s", owner, out)
	}
}

var scriptVarRE = regexp.MustCompile(`KEYGATE_[A-Z0-9_]+`)

// scriptEnvVars are the variables keygate-iptables reads.
func scriptEnvVars(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(scriptPath)
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]bool{}
	for _, m := range scriptVarRE.FindAll(b, -1) {
		vars[string(m)] = true
	}
	return vars
}

func scriptDefaultUID(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(scriptPath)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^DEFAULT_EXEMPT_UIDS=(\d+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("DEFAULT_EXEMPT_UIDS not found in keygate-iptables")
	}
	return string(m[1])
}

// brokerFile is the part of the broker config these tests read.
type brokerFile struct {
	Listen struct {
		Proxy       string `json:"proxy"`
		Transparent string `json:"transparent"`
		Admin       string `json:"admin"`
	} `json:"listen"`
}

// brokerConfig finds the config the broker container is started with: its
// --config path inside a ConfigMap volume (or, for the DaemonSet, the
// template its prepare step renders).
func brokerConfig(t *testing.T, objs []object, p pod, broker *corev1.Container) brokerFile {
	t.Helper()
	data := configMapForBroker(t, objs, p, broker)
	var f brokerFile
	if err := yaml.Unmarshal([]byte(data), &f); err != nil {
		t.Fatalf("%s: broker config: %v", p.owner, err)
	}
	return f
}

func configPath(t *testing.T, c *corev1.Container) string {
	t.Helper()
	args := append(append([]string{}, c.Command...), c.Args...)
	i := slices.Index(args, "--config")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("container %s: no --config in %v", c.Name, args)
	}
	return args[i+1]
}

// configMapForBroker returns the config file's text from the ConfigMap
// mounted where the broker reads it, or the template the DaemonSet's prepare
// step reads.
func configMapForBroker(t *testing.T, objs []object, p pod, broker *corev1.Container) string {
	t.Helper()
	path := configPath(t, broker)
	dir, file := filepath.Split(path)
	dir = filepath.Clean(dir)
	containers := []*corev1.Container{broker}
	if prep := prepareContainer(p); prep != nil {
		// The broker reads what prepare wrote: look at prepare's template.
		containers = []*corev1.Container{prep}
		dir = envValue(prep, "TEMPLATE_DIR")
	}
	for _, c := range containers {
		for _, m := range c.VolumeMounts {
			if filepath.Clean(m.MountPath) != dir {
				continue
			}
			for _, v := range p.spec.Spec.Volumes {
				if v.Name != m.Name || v.ConfigMap == nil {
					continue
				}
				cm, ok := find[*corev1.ConfigMap](objs, "ConfigMap", p.namespace, v.ConfigMap.Name)
				if !ok {
					t.Fatalf("%s: ConfigMap %s not rendered", p.owner, v.ConfigMap.Name)
				}
				data, ok := cm.Data[file]
				if !ok {
					t.Fatalf("%s: ConfigMap %s has no %s", p.owner, cm.Name, file)
				}
				return data
			}
		}
	}
	t.Fatalf("%s: no ConfigMap mounted at %s", p.owner, dir)
	return ""
}

func prepareContainer(p pod) *corev1.Container {
	for i := range p.spec.Spec.InitContainers {
		if c := &p.spec.Spec.InitContainers[i]; c.Name == "prepare" {
			return c
		}
	}
	return nil
}

// checkProbes: liveness /healthz and readiness /readyz on the admin port,
// which is listen.admin's.
func checkProbes(t *testing.T, p pod, c *corev1.Container, cfg brokerFile) {
	t.Helper()
	for _, pr := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
		if pr.probe == nil || pr.probe.HTTPGet == nil || pr.probe.HTTPGet.Path != pr.path || pr.probe.HTTPGet.Port.StrVal != "admin" {
			t.Errorf("%s: %s probe is not httpGet %s on port admin", p.owner, pr.name, pr.path)
		}
	}
	var admin int32
	for _, cp := range c.Ports {
		if cp.Name == "admin" {
			admin = cp.ContainerPort
		}
	}
	_, port, err := net.SplitHostPort(cfg.Listen.Admin)
	if err != nil || port != strconv.Itoa(int(admin)) {
		t.Errorf("%s: port admin is %d, listen.admin is %q", p.owner, admin, cfg.Listen.Admin)
	}
	if host, _, _ := net.SplitHostPort(cfg.Listen.Admin); host == "127.0.0.1" || host == "::1" || host == "localhost" {
		t.Errorf("%s: listen.admin %q is loopback: the kubelet's probes cannot reach it", p.owner, cfg.Listen.Admin)
	}
}

// TestDockerfile: the image users match the manifests.
func TestDockerfile(t *testing.T) {
	users := dockerfileUsers(t)
	if got, want := users["broker"], fmt.Sprintf("%d:%d", brokerUID, brokerUID); got != want {
		t.Errorf("Dockerfile: USER of stage broker is %q, want %q", got, want)
	}
	if got := users["iptables-init"]; got != "0:0" {
		t.Errorf("Dockerfile: USER of stage iptables-init is %q, want 0:0 (the init container runs as root to hold NET_ADMIN)", got)
	}
	b, err := os.ReadFile(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"CGO_ENABLED=0",
		"COPY deploy/keygate-iptables /usr/local/bin/keygate-iptables",
		`ENTRYPOINT ["/usr/local/bin/keygate-iptables"]`,
		`ENTRYPOINT ["/usr/local/bin/broker"]`,
	} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	// The broker stage is last, so a plain `docker build .` builds it.
	if last := lastStage(t); last != "broker" {
		t.Errorf("the last Dockerfile stage is %q, want broker", last)
	}
	for _, dir := range kustomizations {
		for _, p := range pods(render(t, dir)) {
			for _, c := range allContainers(&p.spec.Spec) {
				switch {
				case strings.HasPrefix(c.Image, "keygate/broker:"):
					if u := c.SecurityContext.RunAsUser; u == nil || fmt.Sprintf("%d:%d", *u, *c.SecurityContext.RunAsGroup) != users["broker"] {
						t.Errorf("%s: %s runs the broker image as %v, not its USER %s", p.owner, c.Name, u, users["broker"])
					}
				case strings.HasPrefix(c.Image, "keygate/iptables-init:") && c.Name == redirectInit:
					if u := c.SecurityContext.RunAsUser; u == nil || *u != 0 {
						t.Errorf("%s: %s is not root", p.owner, c.Name)
					}
				}
			}
		}
	}
}

// dockerfileUsers maps each named stage (FROM ... AS name) to its last USER.
func dockerfileUsers(t *testing.T) map[string]string {
	t.Helper()
	users := map[string]string{}
	forEachInstruction(t, func(stage string, f []string) {
		if strings.EqualFold(f[0], "USER") && len(f) == 2 && stage != "" {
			users[stage] = f[1]
		}
	})
	return users
}

func lastStage(t *testing.T) string {
	t.Helper()
	last := ""
	forEachInstruction(t, func(stage string, _ []string) { last = stage })
	return last
}

func forEachInstruction(t *testing.T, fn func(stage string, fields []string)) {
	t.Helper()
	f, err := os.Open(dockerfilePath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stage := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if strings.EqualFold(fields[0], "FROM") {
			stage = ""
			if n := len(fields); n >= 4 && strings.EqualFold(fields[n-2], "AS") {
				stage = fields[n-1]
			}
		}
		fn(stage, fields)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestSPIFFESocket: the base and sidecar overlay use the SPIFFE CSI driver,
// the hostpath overlay the node directory, both mounted read-only where the
// config's socket points.
func TestSPIFFESocket(t *testing.T) {
	for _, c := range []struct {
		dir      string
		hostPath bool
	}{{"base", false}, {"overlays/sidecar", false}, {"overlays/sidecar-hostpath-spire", true}} {
		objs := render(t, c.dir)
		dep, ok := find[*appsv1.Deployment](objs, "Deployment", "keygate-demo", "example-app")
		if !ok {
			t.Fatalf("%s: no Deployment example-app", c.dir)
		}
		var vol *corev1.Volume
		for i := range dep.Spec.Template.Spec.Volumes {
			if v := &dep.Spec.Template.Spec.Volumes[i]; v.Name == "spire-agent-socket" {
				vol = v
			}
		}
		switch {
		case vol == nil:
			t.Errorf("%s: no spire-agent-socket volume", c.dir)
		case c.hostPath && (vol.HostPath == nil || vol.CSI != nil):
			t.Errorf("%s: spire-agent-socket is not (only) a hostPath: %+v", c.dir, vol.VolumeSource)
		case !c.hostPath && (vol.CSI == nil || vol.CSI.Driver != "csi.spiffe.io" || vol.CSI.ReadOnly == nil || !*vol.CSI.ReadOnly || vol.HostPath != nil):
			t.Errorf("%s: spire-agent-socket is not a read-only csi.spiffe.io volume: %+v", c.dir, vol.VolumeSource)
		}
		cm := ""
		for _, o := range objs {
			if o.kind == "ConfigMap" && strings.HasPrefix(o.name, "keygate-config") {
				cm = o.obj.(*corev1.ConfigMap).Data["config.yaml"]
			}
		}
		if !strings.Contains(cm, "socket: unix:///spiffe-workload-api/spire-agent.sock") {
			t.Errorf("%s: the config's spiffe socket is not under the mount /spiffe-workload-api", c.dir)
		}
	}
}

// ---------------------------------------------------------------------------
// broker validate.

var (
	brokerOnce sync.Once
	brokerBin  string
	brokerErr  error
)

// buildBroker builds cmd/broker from the parent module (../..) once.
func buildBroker(t *testing.T) string {
	t.Helper()
	brokerOnce.Do(func() {
		dir, err := os.MkdirTemp("", "keygate-k8s-test-")
		if err != nil {
			brokerErr = err
			return
		}
		brokerBin = filepath.Join(dir, "broker")
		gobin, err := exec.LookPath("go")
		if err != nil {
			brokerErr = err
			return
		}
		cmd := exec.Command(gobin, "build", "-o", brokerBin, "./cmd/broker")
		cmd.Dir = "../.."
		if out, err := cmd.CombinedOutput(); err != nil {
			brokerErr = fmt.Errorf("go build ./cmd/broker: %v\n%s", err, out)
		}
	})
	if brokerErr != nil {
		t.Fatal(brokerErr)
	}
	return brokerBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if brokerBin != "" {
		_ = os.RemoveAll(filepath.Dir(brokerBin))
	}
	os.Exit(code)
}

// validate runs `broker validate` on the config at path. The broker
// container's environment variables that the config references
// (env:NAME) are set to placeholders, as the Secrets would provide them.
func validate(t *testing.T, where, path string, env []string) {
	t.Helper()
	cmd := exec.Command(buildBroker(t), "validate", "--config", path)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("%s: broker validate: %v\n%s", where, err, out)
		return
	}
	t.Logf("%s: %s", where, bytes.TrimSpace(out))
}

// brokerEnv gives the broker container's secretKeyRef variables a
// placeholder value.
func brokerEnv(c *corev1.Container) []string {
	var env []string
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil:
			env = append(env, e.Name+"=placeholder-for-"+strings.ToLower(e.Name))
		default:
			env = append(env, e.Name+"="+e.Value)
		}
	}
	return env
}

// TestConfigsValidate runs every broker config the overlays ship through
// `broker validate`; the DaemonSet's after running its prepare step.
func TestConfigsValidate(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the broker")
	}
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			for _, p := range pods(objs) {
				var broker *corev1.Container
				for _, c := range allContainers(&p.spec.Spec) {
					if c.Name == brokerContainer {
						broker = c
					}
				}
				if broker == nil {
					continue
				}
				data := configMapForBroker(t, objs, p, broker)
				tmp := t.TempDir()
				if prep := prepareContainer(p); prep != nil {
					for _, hostIP := range []string{"127.0.0.1", "::1"} {
						cfg := runPrepare(t, p, prep, data, hostIP, tmp)
						validate(t, p.owner+" (HOST_IP="+hostIP+")", cfg, brokerEnv(broker))
					}
					continue
				}
				path := filepath.Join(tmp, "config.yaml")
				if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
					t.Fatal(err)
				}
				validate(t, p.owner, path, brokerEnv(broker))
			}
		})
	}
}

// runPrepare runs the DaemonSet's prepare script exactly as the manifest
// has it, with its directories moved under tmp, and returns the rendered
// config's path.
func runPrepare(t *testing.T, p pod, prep *corev1.Container, template, hostIP, tmp string) string {
	t.Helper()
	if len(prep.Command) < 2 || prep.Command[0] != "/bin/sh" || len(prep.Args) != 1 {
		t.Fatalf("%s: prepare is not /bin/sh -ec SCRIPT: %v %v", p.owner, prep.Command, prep.Args)
	}
	base := filepath.Join(tmp, strings.ReplaceAll(hostIP, ":", "_"))
	dirs := map[string]string{}
	for _, name := range []string{"TEMPLATE_DIR", "CA_DIR", "OUT_DIR"} {
		if !hasEnv(prep, name) {
			t.Fatalf("%s: prepare has no %s", p.owner, name)
		}
		dirs[name] = filepath.Join(base, strings.ToLower(name))
		if err := os.MkdirAll(dirs[name], 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dirs["TEMPLATE_DIR"], "config.yaml"), []byte(template), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(buildBroker(t), "ca", "init", "--dir", dirs["CA_DIR"]).CombinedOutput(); err != nil {
		t.Fatalf("broker ca init: %v\n%s", err, out)
	}
	cmd := exec.Command("sh", append(prep.Command[1:], prep.Args...)...)
	cmd.Env = append(os.Environ(), "HOST_IP="+hostIP)
	for k, v := range dirs {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: prepare: %v\n%s", p.owner, err, out)
	}
	cfg := filepath.Join(dirs["OUT_DIR"], "config.yaml")
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := hostIP
	if strings.Contains(hostIP, ":") {
		want = "[" + hostIP + "]"
	}
	if !strings.Contains(string(b), want+":15080") || strings.Contains(string(b), "@HOST_IP@") {
		t.Errorf("%s: prepare rendered:\n%s", p.owner, b)
	}
	if fi, err := os.Stat(filepath.Join(dirs["OUT_DIR"], "ca-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: prepare's ca-key.pem: %v %v", p.owner, fi.Mode(), err)
	}
	// A HOST_IP that is not an address is refused (it goes into sed).
	bad := exec.Command("sh", append(prep.Command[1:], prep.Args...)...)
	bad.Env = append(append([]string{}, cmd.Env...), "HOST_IP=1.2.3.4/g;s/x")
	if out, err := bad.CombinedOutput(); err == nil || !strings.Contains(string(out), "bad HOST_IP") {
		t.Errorf("%s: prepare accepted a malformed HOST_IP: %v %s", p.owner, err, out)
	}
	return cfg
}
