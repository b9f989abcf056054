package canarytest

import (
	"encoding/base64"
	"encoding/hex"
	"net/url"
	"strings"
)

// minNeedle is the shortest spelling the sweep searches for (and so the
// shortest secret Register accepts): shorter strings occur by chance in
// ordinary output.
const minNeedle = 12

// forms lists the spellings of secret an echo could produce: the raw value,
// its query and path escaping, lower and upper hex, and standard and
// URL-safe base64 at each of the three byte alignments (the stable middle
// of base64(pad+secret), which is found inside any longer base64 text such
// as a Basic credential). Spellings shorter than minNeedle are left out.
//
// internal/broker has Credential.EncodedForms for redaction; it is not
// reused because broker's own tests import this package (an import cycle),
// and the sweep wants more spellings than redaction does.
func forms(secret string) []string {
	seen := map[string]bool{}
	var out []string
	add := func(s string) {
		if len(s) >= minNeedle && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	add(secret)
	add(url.QueryEscape(secret))
	add(url.PathEscape(secret))
	h := hex.EncodeToString([]byte(secret))
	add(h)
	add(strings.ToUpper(h))
	for pad := 0; pad < 3; pad++ {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			s := enc.EncodeToString(append(make([]byte, pad), secret...))
			start := 0
			if pad > 0 {
				start = 4 // the first quantum mixes in the padding bytes
			}
			end := len(s) - 4 // the last quantum may be partial
			if end > start {
				add(s[start:end])
			}
		}
	}
	return out
}
