package inject

import (
	"fmt"
	"net/netip"
	"net/url"
)

// CheckServiceURL wants the absolute URL of a backend the broker itself
// calls (a token endpoint, STS, Vault, an OIDC issuer): https, without
// credentials, query or fragment; plain http only on loopback, where nothing
// crosses a network. what names the URL in the error ("an endpoint URL");
// loopbackNote completes "http only ..." ("on loopback").
func CheckServiceURL(s, what, loopbackNote string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("%q is not %s", s, what)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip, err := netip.ParseAddr(u.Hostname()); (err == nil && ip.IsLoopback()) || u.Hostname() == "localhost" {
			return nil
		}
	}
	return fmt.Errorf("%q must be https (http only %s)", s, loopbackNote)
}
