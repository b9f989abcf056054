package broker

import (
	"crypto/rand"
	"encoding/hex"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap/zapcore"
)

// Decision values in the audit line.
const (
	AuditAllow  = "allow"
	AuditDeny   = "deny"
	AuditTunnel = "tunnel"
)

// Record is the canonical audit line: one per request, tunnel or database
// session (DESIGN.md §8). It holds no credential value, only a fingerprint.
type Record struct {
	RequestID   string
	Listener    string
	Workload    Identity
	Delegator   string
	Protocol    string
	Method      string
	Host        string
	Port        int
	Path        string
	Database    string // database sessions: the database the client asked for
	DBUser      string // database sessions: the user the client asked for (never the credential's)
	Rule        string
	Decision    string
	CredName    string
	CredKind    string
	CredFP      string
	CredExpires time.Time
	// CredMeta is the credential's non-secret audit detail (a Vault path, a
	// lease id prefix, an assumed role), written as credential.<key>.
	CredMeta map[string]string
	Status   int
	BytesIn  int64
	BytesOut int64
	Duration time.Duration
	Error    string
}

// MarshalLogObject writes the record with the field names of DESIGN.md §8.
func (r *Record) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("request_id", r.RequestID)
	enc.AddString("listener", r.Listener)
	enc.AddString("workload.id", r.Workload.ID)
	enc.AddString("workload.method", r.Workload.Method)
	enc.AddString("delegator.sub", r.Delegator)
	enc.AddString("protocol", r.Protocol)
	enc.AddString("method", r.Method)
	enc.AddString("host", r.Host)
	enc.AddInt("port", r.Port)
	enc.AddString("path", r.Path)
	if r.Database != "" || r.DBUser != "" {
		enc.AddString("database", r.Database)
		enc.AddString("db_user", r.DBUser)
	}
	enc.AddString("rule", r.Rule)
	enc.AddString("decision", r.Decision)
	enc.AddString("credential.name", r.CredName)
	enc.AddString("credential.kind", r.CredKind)
	enc.AddString("credential.fingerprint", r.CredFP)
	if !r.CredExpires.IsZero() {
		enc.AddString("credential.expires", r.CredExpires.UTC().Format(time.RFC3339))
	} else {
		enc.AddString("credential.expires", "")
	}
	for _, k := range sortedKeys(r.CredMeta) {
		switch k {
		case "name", "kind", "fingerprint", "expires":
			continue // a source cannot overwrite the broker's own fields
		}
		enc.AddString("credential."+k, r.CredMeta[k])
	}
	enc.AddInt("status", r.Status)
	enc.AddInt64("bytes_in", r.BytesIn)
	enc.AddInt64("bytes_out", r.BytesOut)
	enc.AddFloat64("duration_ms", float64(r.Duration.Microseconds())/1000)
	enc.AddString("error", r.Error)
	return nil
}

func sortedKeys(m map[string]string) []string {
	if len(m) == 0 {
		return nil
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Request ids are a random per-process prefix and a counter: unique across
// every listener of the process and cheap. They identify a request or a
// session in the audit log; they are not secrets.
var (
	requestIDPrefix = func() string {
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		return hex.EncodeToString(b)
	}()
	requestIDSeq atomic.Uint64
)

// NewRequestID returns the next request id.
func NewRequestID() string {
	var b [16]byte
	return requestIDPrefix + string(strconv.AppendUint(b[:0], requestIDSeq.Add(1)+1<<40, 16)[1:])
}
