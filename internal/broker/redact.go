package broker

import (
	"encoding/base64"
	"net/url"
	"sort"
	"strings"
)

// EncodedForms lists the strings a credential's values can appear as when
// something echoes or quotes them: each value raw, query- and path-escaped,
// and as unpadded standard and URL-safe base64 (a prefix of the padded
// forms), and the same for the Basic pair "username:password". A username
// that comes with a non-empty password is listed only inside the pair:
// alone it is an identifier (Mailgun's "api"), and masking it would corrupt
// unrelated text. extra values (a token derived from the credential) are
// listed like field values. Longest first, without duplicates or empties.
func (c Credential) EncodedForms(extra ...Secret) []string {
	return c.forms(false, extra)
}

// forms is EncodedForms; withUser lists a username on its own even next to
// a password (log redaction, where a JIT database user name is sensitive).
func (c Credential) forms(withUser bool, extra []Secret) []string {
	seen := make(map[string]bool)
	var out []string
	addAll := func(raw string) {
		if raw == "" {
			return
		}
		for _, f := range []string{raw, url.QueryEscape(raw), url.PathEscape(raw),
			base64.RawStdEncoding.EncodeToString([]byte(raw)), base64.RawURLEncoding.EncodeToString([]byte(raw))} {
			if !seen[f] {
				seen[f] = true
				out = append(out, f)
			}
		}
	}
	user, hasUser := c.Fields[FieldUsername]
	pass := c.Fields[FieldPassword]
	for name, v := range c.Fields {
		if name == FieldUsername && !pass.IsZero() && !withUser {
			continue
		}
		addAll(v.Reveal())
	}
	if hasUser && !user.IsZero() {
		addAll(user.Reveal() + ":" + pass.Reveal())
	}
	for _, v := range extra {
		addAll(v.Reveal())
	}
	sort.SliceStable(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// minRedact is the shortest form Redact replaces: shorter values would
// mangle ordinary words in the text around them.
const minRedact = 4

// Redact replaces every encoded form (EncodedForms, plus the username on
// its own: a dynamic database user name is sensitive in a log) of at least
// four bytes with "REDACTED" in s, a string bound for a log line or an
// error. Causes
// come from transports and backends that do not know what is secret, so
// text is cleaned at the last step.
func (c Credential) Redact(s string, extra ...Secret) string {
	if len(c.Fields) == 0 && len(extra) == 0 {
		return s
	}
	for _, f := range c.forms(true, extra) {
		if len(f) >= minRedact {
			s = strings.ReplaceAll(s, f, "REDACTED")
		}
	}
	return s
}
