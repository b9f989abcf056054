package inject

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/keygate/broker/internal/broker"
)

// Injector kinds, as the audit line and `broker explain` show them.
const (
	KindBearer = "bearer"
	KindBasic  = "basic"
	KindHeader = "header"
	KindQuery  = "query"
)

// MaxValueLen is the longest value an injector writes: 8 KiB, measured
// after formatting (for Basic, after base64 and the "Basic " prefix).
const MaxValueLen = 8 << 10

// DefaultHeaderFormat is the format of a header injector given none.
const DefaultHeaderFormat = "{{token}}"

// Reasons a credential value is refused. They are wrapped by the errors of
// CheckValue and of every injector; none of them carries the value.
var (
	ErrControlChars = errors.New("contains control characters")
	ErrTooLong      = fmt.Errorf("is longer than %d bytes", MaxValueLen)
	ErrMissingField = errors.New("is missing or empty")
	ErrColon        = errors.New("contains ':'")
)

// CheckValue reports whether s may be written into a header or query
// value: no ASCII control character other than horizontal tab (so no CR,
// LF or NUL, which would split or truncate a request, and no DEL), and at
// most MaxValueLen bytes. Bytes >= 0x80 are allowed (RFC 9110 obs-text).
// The error never contains s.
func CheckValue(s string) error {
	if err := checkValue(s); err != nil {
		return fmt.Errorf("inject: value %w", err)
	}
	return nil
}

func checkValue(s string) error {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return ErrControlChars
		}
	}
	if len(s) > MaxValueLen {
		return ErrTooLong
	}
	return nil
}

func fieldErr(c broker.Credential, field string, reason error) error {
	return fmt.Errorf("inject: credential %q field %q: %w", c.Name, field, reason)
}

// field returns a validated, non-empty credential field.
func field(c broker.Credential, name string) (string, error) {
	s, ok := c.Field(name)
	if !ok {
		return "", fieldErr(c, name, ErrMissingField)
	}
	v := s.Reveal()
	if err := checkValue(v); err != nil {
		return "", fieldErr(c, name, err)
	}
	return v, nil
}

// setHeader deletes every key of h that equals name in any case (keys may
// be non-canonical when goproxy's PreventCanonicalization is on, or when
// code wrote the map directly), with all their values, then sets exactly
// one value under the canonical name.
func setHeader(r *http.Request, name, value string) {
	if r.Header == nil {
		r.Header = make(http.Header)
	}
	for k := range r.Header {
		if strings.EqualFold(k, name) {
			delete(r.Header, k)
		}
	}
	r.Header[http.CanonicalHeaderKey(name)] = []string{value}
}

// checkFinal validates the complete header value of an injector.
func checkFinal(c broker.Credential, kind, value string) error {
	if err := checkValue(value); err != nil {
		return fmt.Errorf("inject: credential %q: %s value %w", c.Name, kind, err)
	}
	return nil
}

// ---- bearer

type bearer struct{}

// Bearer writes "Authorization: Bearer <token>" from the token field. It
// owns Authorization in every case.
func Bearer() broker.Injector { return bearer{} }

func (bearer) Kind() string { return KindBearer }

func (bearer) Inject(r *http.Request, c broker.Credential) error {
	tok, err := field(c, broker.FieldToken)
	if err != nil {
		return err
	}
	v := "Bearer " + tok
	if err := checkFinal(c, KindBearer, v); err != nil {
		return err
	}
	setHeader(r, "Authorization", v)
	return nil
}

// ---- basic

type basic struct{}

// Basic writes "Authorization: Basic base64(username:password)". The
// username must be non-empty and contain no ':'; the password field must
// be present but may be empty (APIs that take a key as the user name). It
// owns Authorization in every case.
func Basic() broker.Injector { return basic{} }

func (basic) Kind() string { return KindBasic }

func (basic) Inject(r *http.Request, c broker.Credential) error {
	user, err := field(c, broker.FieldUsername)
	if err != nil {
		return err
	}
	if strings.IndexByte(user, ':') >= 0 {
		return fieldErr(c, broker.FieldUsername, ErrColon)
	}
	ps, ok := c.Fields[broker.FieldPassword]
	if !ok {
		return fieldErr(c, broker.FieldPassword, ErrMissingField)
	}
	pass := ps.Reveal()
	if err := checkValue(pass); err != nil {
		return fieldErr(c, broker.FieldPassword, err)
	}
	v := "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
	if err := checkFinal(c, KindBasic, v); err != nil {
		return err
	}
	setHeader(r, "Authorization", v)
	return nil
}

// ---- header

// forbiddenHeaders may not be chosen as an injection target: hop-by-hop
// headers (dropped or interpreted by the next hop), framing and routing
// headers (a credential there could smuggle or misroute the request), and
// keygate's own headers. Names starting with "Proxy-" are refused too.
var forbiddenHeaders = map[string]bool{
	"Connection":        true,
	"Keep-Alive":        true,
	"Te":                true,
	"Trailer":           true,
	"Transfer-Encoding": true,
	"Upgrade":           true,
	"Host":              true,
	"Content-Length":    true,
	"Expect":            true,
}

// forbiddenPrefixes are compared case-insensitively.
var forbiddenPrefixes = []string{"Proxy-", "X-Keygate-", "X-Broker-"}

// ErrBadHeaderName and ErrBadFormat are wrapped by Header's errors.
var (
	ErrBadHeaderName = errors.New("invalid header name")
	ErrBadFormat     = errors.New("invalid header format")
	ErrBadQueryName  = errors.New("invalid query parameter name")
)

type segment struct {
	lit   string
	field string // a placeholder when non-empty
}

type header struct {
	name   string // canonical
	format []segment
}

// Header writes header name = format, where each {{field}} placeholder is
// replaced by that credential field ("{{ field }}" is accepted too). The
// default format is "{{token}}". name must be a valid header token and not
// a hop-by-hop, framing (Content-Length, Transfer-Encoding, Expect), Host,
// Proxy-* or keygate-internal header. The format must have at least one
// placeholder, balanced braces, and no control characters in its literal
// text. The injector owns name in every case.
func Header(name, format string) (broker.Injector, error) {
	if !httpguts.ValidHeaderFieldName(name) {
		return nil, fmt.Errorf("inject: header %q: %w", name, ErrBadHeaderName)
	}
	canon := http.CanonicalHeaderKey(name)
	if forbiddenHeaders[canon] {
		return nil, fmt.Errorf("inject: header %q: hop-by-hop, framing or Host header cannot carry a credential: %w", name, ErrBadHeaderName)
	}
	for _, p := range forbiddenPrefixes {
		if len(name) >= len(p) && strings.EqualFold(name[:len(p)], p) {
			return nil, fmt.Errorf("inject: header %q: %s* headers cannot carry a credential: %w", name, p, ErrBadHeaderName)
		}
	}
	if format == "" {
		format = DefaultHeaderFormat
	}
	segs, err := parseFormat(format)
	if err != nil {
		return nil, fmt.Errorf("inject: header %q: %w", name, err)
	}
	return &header{name: canon, format: segs}, nil
}

func parseFormat(f string) ([]segment, error) {
	var segs []segment
	placeholders := 0
	rest := f
	for rest != "" {
		i := strings.Index(rest, "{{")
		lit := rest
		if i >= 0 {
			lit = rest[:i]
		}
		if strings.Contains(lit, "}}") {
			return nil, fmt.Errorf("format has \"}}\" without \"{{\": %w", ErrBadFormat)
		}
		if err := checkValue(lit); err != nil {
			return nil, fmt.Errorf("format text %w: %w", err, ErrBadFormat)
		}
		if lit != "" {
			segs = append(segs, segment{lit: lit})
		}
		if i < 0 {
			break
		}
		rest = rest[i+2:]
		j := strings.Index(rest, "}}")
		if j < 0 {
			return nil, fmt.Errorf("format has \"{{\" without \"}}\": %w", ErrBadFormat)
		}
		name := strings.TrimSpace(rest[:j])
		if !validFieldName(name) {
			return nil, fmt.Errorf("format placeholder %q is not a field name: %w", name, ErrBadFormat)
		}
		segs = append(segs, segment{field: name})
		placeholders++
		rest = rest[j+2:]
	}
	if placeholders == 0 {
		return nil, fmt.Errorf("format has no {{field}} placeholder: %w", ErrBadFormat)
	}
	return segs, nil
}

func validFieldName(n string) bool {
	if n == "" {
		return false
	}
	for i := 0; i < len(n); i++ {
		c := n[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

func (*header) Kind() string { return KindHeader }

func (h *header) Inject(r *http.Request, c broker.Credential) error {
	var b strings.Builder
	for _, s := range h.format {
		if s.field == "" {
			b.WriteString(s.lit)
			continue
		}
		v, err := field(c, s.field)
		if err != nil {
			return err
		}
		b.WriteString(v)
	}
	v := b.String()
	if err := checkFinal(c, KindHeader, v); err != nil {
		return err
	}
	setHeader(r, h.name, v)
	return nil
}

// ---- query

type query struct{ name string }

// Query writes the URL query parameter name = the token field. Parameter
// names are case-sensitive (as in HTTP and every common server), so the
// injector owns exactly name: every occurrence whose percent-decoded key
// equals name is removed (api_key, api%5Fkey, api_key without '='), and a
// ';'-separated pair with that key removes its whole '&' segment, for
// servers that still split on ';'. API_KEY is not owned and is kept. All
// other bytes of the query are kept in order; the injected pair is
// appended. Only the URL is owned, not a form body.
func Query(name string) (broker.Injector, error) {
	if name == "" {
		return nil, fmt.Errorf("inject: query parameter name is empty: %w", ErrBadQueryName)
	}
	if err := checkValue(name); err != nil {
		return nil, fmt.Errorf("inject: query parameter name %w: %w", err, ErrBadQueryName)
	}
	return &query{name: name}, nil
}

func (*query) Kind() string { return KindQuery }

func (q *query) Inject(r *http.Request, c broker.Credential) error {
	tok, err := field(c, broker.FieldToken)
	if err != nil {
		return err
	}
	if r.URL == nil {
		return fmt.Errorf("inject: credential %q: request has no URL", c.Name)
	}
	pair := url.QueryEscape(q.name) + "=" + url.QueryEscape(tok)
	kept := make([]string, 0, 8)
	for _, seg := range strings.Split(r.URL.RawQuery, "&") {
		if seg == "" || q.owns(seg) {
			continue
		}
		kept = append(kept, seg)
	}
	kept = append(kept, pair)
	r.URL.RawQuery = strings.Join(kept, "&")
	r.URL.ForceQuery = false
	return nil
}

// owns reports whether an '&' segment carries the parameter, counting
// ';'-separated sub-pairs too.
func (q *query) owns(seg string) bool {
	for _, sub := range strings.Split(seg, ";") {
		k, _, _ := strings.Cut(sub, "=")
		if k == q.name {
			return true
		}
		if dk, err := url.QueryUnescape(k); err == nil && dk == q.name {
			return true
		}
	}
	return false
}
