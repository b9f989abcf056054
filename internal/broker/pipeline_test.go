package broker

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"
)

type fakeAttestor struct {
	id  Identity
	err error
}

func (f fakeAttestor) Attest(context.Context, Evidence) (Identity, error) { return f.id, f.err }

type fakePolicy struct {
	d   Decision
	err error
}

func (f fakePolicy) Decide(context.Context, Identity, Target) (Decision, error) { return f.d, f.err }

type fakeSource struct {
	c     Credential
	err   error
	calls int
}

func (f *fakeSource) Credential(context.Context, Identity, Grant) (Credential, error) {
	f.calls++
	return f.c, f.err
}

type fakeInjector struct{ err error }

func (f fakeInjector) Inject(r *http.Request, c Credential) error {
	if f.err != nil {
		return f.err
	}
	r.Header.Set("Authorization", "Bearer "+c.Fields[FieldToken].Reveal())
	return nil
}
func (fakeInjector) Kind() string { return "fake" }

type fixedClock time.Time

func (c fixedClock) Now() time.Time { return time.Time(c) }

func TestPipelineAuthorize(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	good := Credential{Name: "tok", Fields: map[string]Secret{FieldToken: NewSecret("v")}}
	allow := Decision{Action: Allow, Rule: "r", Inject: &Injection{Credential: "tok", Injector: fakeInjector{}}}
	https := Target{Phase: PhaseRequest, Protocol: ProtocolHTTPS, Host: "h", Port: 443}
	httpT := Target{Phase: PhaseRequest, Protocol: ProtocolHTTP, Host: "h", Port: 80}
	tests := []struct {
		name     string
		policy   Policy
		src      *fakeSource
		target   Target
		wantCode string // "" means success
		wantAuth bool
	}{
		{"zero decision denies", fakePolicy{}, &fakeSource{c: good}, https, CodeDenied, false},
		{"policy error denies", fakePolicy{d: allow, err: errors.New("cel")}, &fakeSource{c: good}, https, CodeRuleError, false},
		{"nil policy denies", nil, &fakeSource{c: good}, https, CodeDenied, false},
		{"allow injects", fakePolicy{d: allow}, &fakeSource{c: good}, https, "", true},
		{"allow without injection", fakePolicy{d: Decision{Action: Allow, Rule: "r"}}, &fakeSource{c: good}, https, "", false},
		{"plaintext refused", fakePolicy{d: allow}, &fakeSource{c: good}, httpT, CodePlaintextDenied, false},
		{"plaintext allowed by rule", fakePolicy{d: Decision{Action: Allow, Rule: "r", Inject: allow.Inject, AllowPlaintext: true}}, &fakeSource{c: good}, httpT, "", true},
		{"source error is 503", fakePolicy{d: allow}, &fakeSource{err: errors.New("down")}, https, CodeCredentialUnavailable, false},
		{"expired credential is 503", fakePolicy{d: allow}, &fakeSource{c: Credential{Fields: good.Fields, Expires: now}}, https, CodeCredentialUnavailable, false},
		{"injector failure is 502", fakePolicy{d: Decision{Action: Allow, Rule: "r", Inject: &Injection{Credential: "tok", Injector: fakeInjector{err: errors.New("bad value")}}}}, &fakeSource{c: good}, https, CodeCredentialMalformed, false},
		{"unknown credential is 503", fakePolicy{d: Decision{Action: Allow, Rule: "r", Inject: &Injection{Credential: "nope", Injector: fakeInjector{}}}}, &fakeSource{c: good}, https, CodeCredentialUnavailable, false},
		{"tunnel never injects", fakePolicy{d: Decision{Action: Tunnel, Rule: "r", Inject: allow.Inject}}, &fakeSource{c: good}, https, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &Pipeline{Policy: tt.policy, Sources: map[string]Source{"tok": tt.src}, Clock: fixedClock(now)}
			r, _ := http.NewRequest(http.MethodGet, "https://h/", nil)
			_, _, err := p.Authorize(context.Background(), Identity{ID: "w", Method: MethodCIDR}, tt.target, r)
			if tt.wantCode == "" && err != nil {
				t.Fatalf("unexpected error %v", err)
			}
			if tt.wantCode != "" {
				var be *Error
				if !errors.As(err, &be) || be.Code != tt.wantCode {
					t.Fatalf("err = %v, want code %s", err, tt.wantCode)
				}
			}
			if got := r.Header.Get("Authorization") != ""; got != tt.wantAuth {
				t.Fatalf("Authorization set = %v, want %v", got, tt.wantAuth)
			}
		})
	}
}

func TestPipelineAttest(t *testing.T) {
	tests := []struct {
		name string
		a    Attestor
		ok   bool
	}{
		{"no attestor", nil, false},
		{"no evidence is anonymous", fakeAttestor{err: ErrNoEvidence}, true},
		{"invalid", fakeAttestor{err: ErrInvalidEvidence}, false},
		{"internal", fakeAttestor{err: errors.New("x")}, false},
		{"empty identity", fakeAttestor{}, false},
		{"ok", fakeAttestor{id: Identity{ID: "w", Method: MethodCIDR}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &Pipeline{Attestor: tt.a}
			_, err := p.Attest(context.Background(), Evidence{})
			if tt.ok != (err == nil) {
				t.Fatalf("err = %v", err)
			}
			var be *Error
			want := http.StatusProxyAuthRequired
			if tt.name == "internal" {
				want = http.StatusServiceUnavailable // the attestor could not decide
			}
			if err != nil && (!errors.As(err, &be) || be.Status() != want) {
				t.Fatalf("attestation failure: %v, want status %d", err, want)
			}
		})
	}
}

func TestAnonymousDenialIs407(t *testing.T) {
	p := &Pipeline{Attestor: fakeAttestor{err: ErrNoEvidence}, Policy: fakePolicy{}}
	id, err := p.Attest(context.Background(), Evidence{})
	if err != nil || id.Method != MethodAnonymous {
		t.Fatalf("id = %+v, err = %v; want the anonymous identity", id, err)
	}
	_, err = p.Decide(context.Background(), id, Target{Phase: PhaseConnect})
	var be *Error
	if !errors.As(err, &be) || be.Status() != http.StatusProxyAuthRequired {
		t.Fatalf("anonymous denial = %v, want 407", err)
	}
	_, err = p.Decide(context.Background(), Identity{ID: "w", Method: MethodCIDR}, Target{Phase: PhaseConnect})
	if !errors.As(err, &be) || be.Status() != http.StatusForbidden {
		t.Fatalf("attested denial = %v, want 403", err)
	}
}
