package broker

import "strconv"

// Protocols a Target can carry.
const (
	ProtocolHTTP     = "http"
	ProtocolHTTPS    = "https"
	ProtocolPostgres = "postgres"
)

// Phase says how much of a Target is known.
type Phase int

const (
	// PhaseConnect: only host and port are known (CONNECT or TLS SNI).
	PhaseConnect Phase = iota + 1
	// PhaseRequest: method, path, query and headers are known too.
	PhaseRequest
)

func (p Phase) String() string {
	switch p {
	case PhaseConnect:
		return "connect"
	case PhaseRequest:
		return "request"
	}
	return "unknown"
}

// Target is where a caller wants to go. Host is normalised (lower case, no
// trailing dot, IPv6 without brackets) so rules and the dialer see one
// spelling.
type Target struct {
	Phase    Phase
	Protocol string
	Host     string
	Port     int
	Method   string
	Path     string
	Query    string
	Headers  map[string]string // lower-case names; repeated values joined with ", "
	Database string
	User     string
}

// Authority is host:port in dialable form.
func (t Target) Authority() string {
	h := t.Host
	for i := 0; i < len(h); i++ {
		if h[i] == ':' {
			h = "[" + h + "]"
			break
		}
	}
	return h + ":" + strconv.Itoa(t.Port)
}
