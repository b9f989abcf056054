package canarytest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
)

// DefaultRetain is how many captured bytes the default registry keeps for
// the final sweep. Bytes beyond it are still searched for the canaries
// registered when they arrive, but not for later ones (the report says how
// many bytes that was).
const DefaultRetain = 64 << 20

// carryMax bounds the tail of a stream kept to find a needle split across
// two writes.
const carryMax = 4096

// Leak is one canary found in one source.
type Leak struct {
	Label  string // the canary's label; the value is never reported
	Source string // where it was found ("stdout", "broker output (x)", ...)
}

// Registry holds canaries and captured output. The zero value is not
// usable; use NewRegistry. Safe for concurrent use.
type Registry struct {
	mu       sync.Mutex
	retain   int64
	m        *matcher
	labels   map[string]string // value -> label
	sources  map[string]*source
	order    []string
	kept     int64
	dropped  int64
	leaks    map[Leak]bool
	canaries int
}

type source struct {
	data  bytes.Buffer // retained bytes (documents separated by NUL)
	carry []byte       // stream tail for split needles
	seen  int64        // every byte observed, retained or not
}

// NewRegistry returns an empty registry that retains up to retain bytes of
// captured output for the final sweep.
func NewRegistry(retain int64) *Registry {
	return &Registry{retain: retain, m: newMatcher(), labels: map[string]string{},
		sources: map[string]*source{}, leaks: map[Leak]bool{}}
}

// Default is the process-wide registry Main sweeps.
var Default = NewRegistry(DefaultRetain)

// New returns a fresh canary "CANARY-<label>-<32 hex>" registered in the
// default registry. label says what the canary stands for in a report.
func New(label string) string { return Default.New(label) }

// Register adds a secret a real backend generated (a Vault-issued password,
// a server's root secret) to the default registry.
func Register(label, value string) { Default.Register(label, value) }

// Observe hands captured output to the default registry: a response a
// client was shown, an error string, a log or audit line, metrics text.
func Observe(source string, data []byte) { Default.Observe(source, data) }

// ObserveString is Observe for a string.
func ObserveString(source, data string) { Default.Observe(source, []byte(data)) }

// Writer returns a writer whose bytes go to the default registry as one
// continuous stream (subprocess output).
func Writer(source string) io.Writer { return Default.Writer(source) }

// Seen reports how many bytes the default registry has observed from
// sources whose name starts with prefix.
func Seen(prefix string) int64 { return Default.Seen(prefix) }

// New makes and registers a canary.
func (r *Registry) New(label string) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic("canarytest: random: " + err.Error())
	}
	v := "CANARY-" + safeLabel(label) + "-" + hex.EncodeToString(b)
	r.Register(label, v)
	return v
}

// safeLabel keeps letters, digits and '-' so a canary is a valid token,
// header value, password and URL component.
func safeLabel(label string) string {
	var b strings.Builder
	for _, c := range label {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 {
		return "x"
	}
	return b.String()
}

// Register adds value under label. A value shorter than 12 bytes cannot be
// searched for without false hits and panics: only tests call this, and a
// silently unswept secret is worse than a loud test bug.
func (r *Registry) Register(label, value string) {
	if len(value) < minNeedle {
		panic(fmt.Sprintf("canarytest: secret %q is shorter than %d bytes and cannot be swept", label, minNeedle))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.labels[value]; ok {
		return
	}
	r.labels[value] = label
	r.canaries++
	for _, f := range forms(value) {
		r.m.add(needle{text: f, label: label})
	}
}

// Observe records one document from source. Documents of one source are
// kept apart, so a needle never spans two of them.
func (r *Registry) Observe(src string, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.source(src)
	s.seen += int64(len(data))
	r.m.find(data, func(n needle) { r.leaks[Leak{n.label, src}] = true })
	r.keep(s, data, true)
}

// Writer returns a stream writer for src.
func (r *Registry) Writer(src string) io.Writer { return streamWriter{r, src} }

type streamWriter struct {
	r   *Registry
	src string
}

func (w streamWriter) Write(p []byte) (int, error) {
	w.r.stream(w.src, p)
	return len(p), nil
}

func (r *Registry) stream(src string, p []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.source(src)
	s.seen += int64(len(p))
	buf := append(append([]byte(nil), s.carry...), p...)
	r.m.find(buf, func(n needle) { r.leaks[Leak{n.label, src}] = true })
	if len(buf) > carryMax {
		buf = buf[len(buf)-carryMax:]
	}
	s.carry = buf
	r.keep(s, p, false)
}

func (r *Registry) source(src string) *source {
	s, ok := r.sources[src]
	if !ok {
		s = &source{}
		r.sources[src] = s
		r.order = append(r.order, src)
	}
	return s
}

// keep retains data for the final sweep while under the budget.
func (r *Registry) keep(s *source, data []byte, document bool) {
	n := int64(len(data))
	if document {
		n++
	}
	if r.kept+n > r.retain {
		r.dropped += int64(len(data))
		return
	}
	r.kept += n
	s.data.Write(data)
	if document {
		s.data.WriteByte(0)
	}
}

// Seen reports the bytes observed from sources starting with prefix.
func (r *Registry) Seen(prefix string) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var n int64
	for name, s := range r.sources {
		if strings.HasPrefix(name, prefix) {
			n += s.seen
		}
	}
	return n
}

// Sweep searches all retained output for all canaries (including ones
// registered after the output arrived) and returns every leak found so
// far, sorted, with the number of observed bytes that were not retained.
func (r *Registry) Sweep() (leaks []Leak, unretained int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, name := range r.order {
		src := name
		r.m.find(r.sources[src].data.Bytes(), func(n needle) { r.leaks[Leak{n.label, src}] = true })
	}
	for l := range r.leaks {
		leaks = append(leaks, l)
	}
	sort.Slice(leaks, func(i, j int) bool {
		if leaks[i].Source != leaks[j].Source {
			return leaks[i].Source < leaks[j].Source
		}
		return leaks[i].Label < leaks[j].Label
	})
	return leaks, r.dropped
}

// Report sweeps and writes one line per leak to w (label and source only)
// and a summary; it returns the number of leaks.
func (r *Registry) Report(w io.Writer) int {
	leaks, dropped := r.Sweep()
	for _, l := range leaks {
		fmt.Fprintf(w, "canarytest: SECRET LEAK: %s found in %s\n", l.Label, l.Source)
	}
	if dropped > 0 {
		fmt.Fprintf(w, "canarytest: note: %d captured bytes exceeded the retention budget and were searched only for canaries registered before they arrived\n", dropped)
	}
	return len(leaks)
}

// Stats reports how many canaries are registered and how many bytes were
// observed in total (a sweep over nothing proves nothing).
func (r *Registry) Stats() (canaries int, observed int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.sources {
		observed += s.seen
	}
	return r.canaries, observed
}
