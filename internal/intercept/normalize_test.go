package intercept

import (
	"testing"
)

func TestNormalizeHost(t *testing.T) {
	tests := []struct {
		in, want string // want "" means an error
	}{
		{"api.github.com", "api.github.com"},
		{"API.GitHub.COM", "api.github.com"},
		{"allowed.", "allowed"},
		{"ALLOWED", "allowed"},
		{"localhost.", "localhost"},
		{"LOCALHOST", "localhost"},
		{"127.0.0.1", "127.0.0.1"},
		{"127.1", "127.0.0.1"},
		{"2130706433", "127.0.0.1"},
		{"0x7f.1", "127.0.0.1"},
		{"0177.0.0.1", "127.0.0.1"},
		{"0x7f000001", "127.0.0.1"},
		{"169.254.169.254", "169.254.169.254"},
		{"[::1]", "::1"},
		{"::1", "::1"},
		{"[::ffff:127.0.0.1]", "127.0.0.1"},
		{"[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe"},
		{"[2001:DB8::1]", "2001:db8::1"},
		{"bücher.example", "xn--bcher-kva.example"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"under_score.example", "under_score.example"},
		{"", ""},
		{".", ""},
		{"a..b", ""},
		{"allowed..", ""},
		{"allowed.com@evil.com", ""},
		{"allowed.com ", ""},
		{" allowed.com", ""},
		{"allowed.com\t", ""},
		{"allowed%2ecom", ""},
		{"[fe80::1%eth0]", ""},
		{"fe80::1%25eth0", ""},
		{"evil.com/allowed.com", ""},
		{"evil\\allowed", ""},
		{"1.2.3.4.5", ""},
		{"256.1.1.1", ""},
		{"1.2.3.256", ""},
		{"08.1.1.1", ""},
		{"[::1", ""},
		{"[127.0.0.1]", ""},
		{"a.b.c.123", ""},
		{"0x.0x.0x.0x", "0.0.0.0"},
		{"123abc", "123abc"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := NormalizeHost(tt.in)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("NormalizeHost(%q) = %q, want error", tt.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("NormalizeHost(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("NormalizeHost(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestSplitHostPort(t *testing.T) {
	tests := []struct {
		in       string
		wantHost string
		wantPort int // 0: error
	}{
		{"api.github.com", "api.github.com", 443},
		{"api.github.com:443", "api.github.com", 443},
		{"API.github.com.:8443", "api.github.com", 8443},
		{"[::1]:443", "::1", 443},
		{"[::1]", "::1", 443},
		{"::1:443", "", 0},
		{"host:", "", 0},
		{"host:0", "", 0},
		{"host:65536", "", 0},
		{"host:+443", "", 0},
		{"host:0443", "", 0},
		{"host:44a", "", 0},
		{"[::1]x", "", 0},
		{"[::1]:", "", 0},
		{"127.1:22", "127.0.0.1", 22},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			h, p, err := SplitHostPort(tt.in, 443)
			if tt.wantPort == 0 {
				if err == nil {
					t.Fatalf("SplitHostPort(%q) = %q %d, want error", tt.in, h, p)
				}
				return
			}
			if err != nil || h != tt.wantHost || p != tt.wantPort {
				t.Fatalf("SplitHostPort(%q) = %q %d %v, want %q %d", tt.in, h, p, err, tt.wantHost, tt.wantPort)
			}
		})
	}
}

// FuzzHostNormalize checks that normalisation is idempotent, so a rule sees
// the same host whether the input was normalised once or twice, and that the
// output is always something the dialer can take as-is.
func FuzzHostNormalize(f *testing.F) {
	for _, s := range []string{"api.github.com", "127.1", "0x7f.1", "[::ffff:127.0.0.1]", "bücher.example", "ALLOWED.", "a..b", "1.2.3.4.5", "[fe80::1%eth0]", "xn--bcher-kva.example"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		once, err := NormalizeHost(in)
		if err != nil {
			return
		}
		twice, err := NormalizeHost(once)
		if err != nil {
			t.Fatalf("NormalizeHost(%q) = %q, which does not normalise: %v", in, once, err)
		}
		if once != twice {
			t.Fatalf("not idempotent: %q -> %q -> %q", in, once, twice)
		}
		for i := 0; i < len(once); i++ {
			if c := once[i]; c <= ' ' || c >= 0x7f || c == '%' || c == '@' || c == '/' {
				t.Fatalf("NormalizeHost(%q) = %q contains %q", in, once, c)
			}
		}
	})
}
