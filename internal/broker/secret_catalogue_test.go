package broker

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// holder keeps a Secret in an unexported field: fmt prints such fields by
// reflection without calling their methods, the way a debug %+v of an
// internal struct would.
type holder struct {
	name string
	s    Secret
	m    map[string]Secret
	p    *Secret
}

// TestSecretTypeNeverFormats (SECURITY-TESTS T-B11): every way a Secret can
// be turned into text — fmt verbs, bad verbs, %w, error wrapping, JSON,
// text marshalling, zap fields and encoders, nested in exported and
// unexported fields — yields the redaction marker, never the value.
func TestSecretTypeNeverFormats(t *testing.T) {
	value := "CANARY-" + fmt.Sprint(len(t.Name())) + "-b11-4f2a9c"
	s := NewSecret(value)
	c := Credential{Name: "n", Fields: map[string]Secret{FieldToken: s}}
	h := holder{name: "h", s: s, m: map[string]Secret{"k": s}, p: &s}
	// A format string in a variable: vet refuses the bad verbs below as
	// constants, and a real bug would not be a constant either.
	format := func(f string, args ...any) string { return fmt.Sprintf(f, args...) }
	errorf := func(f string, args ...any) error { return fmt.Errorf(f, args...) }

	forms := map[string]string{}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T %v", "%10.3s", "%-20q", "%w", "%!", "%[1]v %[1]s"} {
		forms["Secret "+verb] = format(verb, s)
		forms["*Secret "+verb] = format(verb, &s)
		forms["Credential "+verb] = format(verb, c)
		forms["unexported holder "+verb] = format(verb, h)
		forms["unexported *holder "+verb] = format(verb, &h)
		forms["slice "+verb] = format(verb, []Secret{s})
		forms["map "+verb] = format(verb, map[string]any{"s": s})
	}
	wrapVerb := "fetch: %w" // a variable: vet rejects a constant %w of a non-error
	forms["Errorf %w of a Secret"] = errorf(wrapVerb, s).Error()
	forms["Errorf %v"] = errorf("fetch: %v", s).Error()
	inner := errorf("inner: %v %+v", s, h)
	wrapped := fmt.Errorf("outer: %w", inner)
	forms["Errorf %w chain"] = wrapped.Error()
	forms["errors.Join"] = errors.Join(inner, errors.New("x")).Error()
	forms["broker.Error"] = NewError(CodeCredentialMalformed, "m", inner).Error()
	forms["Sprint"] = fmt.Sprint(s, h, c)
	forms["Sprintln"] = fmt.Sprintln(s, &h)
	forms["String"] = s.String()
	forms["GoString"] = s.GoString()

	for name, v := range map[string]any{"Secret": s, "*Secret": &s, "map": map[string]Secret{"a": s},
		"struct": struct{ S Secret }{s}, "unexported holder": h} {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("json.Marshal(%s): %v", name, err)
		}
		forms["json "+name] = string(b)
	}
	tb, _ := s.MarshalText()
	forms["MarshalText"] = string(tb)

	// zap through the production JSON and the console encoders.
	for _, enc := range []struct {
		name string
		e    zapcore.Encoder
	}{
		{"json", zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())},
		{"console", zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig())},
	} {
		var buf bytes.Buffer
		log := zap.New(zapcore.NewCore(enc.e, zapcore.AddSync(&buf), zap.DebugLevel))
		log.Info("x", zap.Any("secret", s), zap.Any("ptr", &s), zap.Any("cred", c), zap.Stringer("stringer", s),
			zap.Reflect("reflect", s), zap.Any("holder", h), zap.Error(wrapped), zap.Any("fields", c.Fields))
		log.Sugar().Infow("sugared", "secret", s, "holder", h)
		log.Sugar().Infof("template %v %+v %#v", s, h, c)
		forms["zap "+enc.name] = buf.String()
	}

	for name, out := range forms {
		t.Run(name, func(t *testing.T) {
			if strings.Contains(out, value) {
				// The output itself would print the canary: name the form only.
				t.Fatal("the secret value appears in this form")
			}
		})
	}
	// The bare Secret forms show the marker (not an empty string, which
	// would hide a bug that drops the value and the marker together).
	for _, name := range []string{"Secret %v", "Secret %s", "String", "json Secret", "MarshalText"} {
		if !strings.Contains(forms[name], redacted) {
			t.Errorf("%s: %q lacks %q", name, forms[name], redacted)
		}
	}
	if s.Reveal() != value || s.Len() != len(value) || s.IsZero() {
		t.Fatal("the Secret lost its value")
	}
	if z := NewSecret(""); !z.IsZero() || z.Reveal() != "" || z.Len() != 0 || !(Secret{}).IsZero() {
		t.Fatal("an empty Secret is not zero")
	}
}
