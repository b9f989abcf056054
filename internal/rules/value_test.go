package rules

import (
	"context"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

func TestCompileValue(t *testing.T) {
	tests := []struct {
		name, expr string
		kind       ValueKind
		wantErr    string
	}{
		{"string", `"ci-" + workload.id`, ValueString, ""},
		{"dyn claim", `workload.claims.team`, ValueString, ""},
		{"map literal", `{"Version": "2012-10-17", "Statement": []}`, ValueJSON, ""},
		{"json string", `'{"Version": "2012-10-17"}'`, ValueJSON, ""},
		{"int for string", `1 + 2`, ValueString, "must be a string"},
		{"bool for json", `true`, ValueJSON, "must be a map, a list or a JSON string"},
		{"syntax", `"a" +`, ValueString, "Syntax error"},
		{"unknown var", `secret`, ValueString, "undeclared reference"},
		{"empty", `  `, ValueString, "empty"},
		{"strings ext", `request.path.split("/")[1]`, ValueString, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := CompileValue(tc.expr, tc.kind, Options{})
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("CompileValue: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestValueEval(t *testing.T) {
	id := broker.Identity{ID: "spiffe://example.org/ci/build", Method: "spiffe-x509",
		Claims: map[string]any{"team": "payments"}}
	tg := broker.Target{Phase: broker.PhaseRequest, Protocol: "https", Host: "minio.test", Port: 443,
		Method: "GET", Path: "/bucket-a/reports/q1.csv"}
	policy := `{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"],
		"Resource": ["arn:aws:s3:::" + request.path.split("/")[1] + "/*"]}]}`
	tests := []struct {
		name, expr string
		kind       ValueKind
		want       string
		wantErr    string
	}{
		{"string", `"ci-" + workload.claims.team`, ValueString, "ci-payments", ""},
		{"policy from path", policy, ValueJSON,
			`{"Statement":[{"Action":["s3:GetObject"],"Effect":"Allow","Resource":["arn:aws:s3:::bucket-a/*"]}],"Version":"2012-10-17"}`, ""},
		{"json string normalised", `'{ "b": 1, "a": "x&y" }'`, ValueJSON, `{"a":"x&y","b":1}`, ""},
		{"json string invalid", `'{"a": '`, ValueJSON, "", "not valid JSON"},
		{"json scalar string", `'"x"'`, ValueJSON, "", "not a JSON object or array"},
		{"json trailing data", `'{} {}'`, ValueJSON, "", "after the JSON value"},
		{"missing claim", `workload.claims.nope`, ValueString, "", "no such key"},
		{"dyn not string", `workload.claims.n`, ValueString, "", "not string"},
	}
	id.Claims["n"] = 3.0
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, err := CompileValue(tc.expr, tc.kind, Options{})
			if err != nil {
				t.Fatalf("CompileValue: %v", err)
			}
			got, err := v.Eval(context.Background(), id, tg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Eval: %v", err)
			}
			if got != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

// A JSON error must not echo the request data it was built from.
func TestValueErrorHasNoData(t *testing.T) {
	canary := canarytest.New("rules path value")
	v, err := CompileValue(`'{"Resource": "' + request.path`, ValueJSON, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Eval(context.Background(), broker.Identity{}, broker.Target{Path: "/" + canary})
	if err == nil || strings.Contains(err.Error(), canary) {
		t.Fatalf("error = %v; want an error without the request data", err)
	}
}

func TestValueStringList(t *testing.T) {
	id := broker.Identity{ID: "repo:acme/app:ref:refs/heads/main", Method: "oidc",
		Claims: map[string]any{"repository": "acme/app", "scopes": []any{"read", "write"}, "mixed": []any{"read", 3.0}, "n": 3.0}}
	tg := broker.Target{Phase: broker.PhaseRequest, Protocol: "https", Host: "api.example.test", Port: 443, Method: "GET", Path: "/v1/items"}
	tests := []struct {
		name, expr string
		want       string
		compileErr string
		evalErr    string
	}{
		{"list literal", `["read", "write"]`, `["read","write"]`, "", ""},
		{"conditional list", `request.method == "GET" ? ["read"] : ["read", "write"]`, `["read"]`, "", ""},
		{"space separated", `"read  write\tadmin"`, `["read","write","admin"]`, "", ""},
		{"claim string", `workload.claims.repository`, `["acme/app"]`, "", ""},
		{"list from claim", `[workload.claims.repository]`, `["acme/app"]`, "", ""},
		{"dyn list claim", `workload.claims.scopes`, `["read","write"]`, "", ""},
		{"empty string", `""`, `[]`, "", ""},
		{"empty list", `[]`, `[]`, "", ""},
		{"json special chars kept", `["a&b", "<c>"]`, `["a&b","<c>"]`, "", ""},
		{"int", `1`, "", "must be a list of strings", ""},
		{"map", `{"a": "b"}`, "", "must be a list of strings", ""},
		{"list of ints", `[1, 2]`, "", "", "element 0 has type int"},
		{"mixed dyn list", `workload.claims.mixed`, "", "", "element 1 has type double"},
		{"dyn number", `workload.claims.n`, "", "", "not a list of strings"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, err := CompileValue(tc.expr, ValueStringList, Options{})
			if tc.compileErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.compileErr) {
					t.Fatalf("compile error = %v, want %q", err, tc.compileErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("CompileValue: %v", err)
			}
			got, err := v.Eval(context.Background(), id, tg)
			if tc.evalErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.evalErr) {
					t.Fatalf("eval error = %v, want %q", err, tc.evalErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Eval: %v", err)
			}
			if got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}
