package config

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Every file in testdata/broken/NAME.yaml is a config `broker validate` must
// refuse, and NAME.want lists every problem it must report, one per line:
//
//	LINE: substring of the message
//	LINE?: substring      (optional: a known follow-on problem that may go away)
//	LINE: first ... second (both parts, in this order)
//
// Blank lines and lines starting with '#' are comments. The match is exact
// in both directions: every listed problem is reported at that line, and
// every reported problem is listed, so "reports every problem, not just the
// first" and "reports nothing spurious" are both checked.

// wantProblem is one line of a .want file.
type wantProblem struct {
	line     int
	substr   string
	optional bool
	src      int // line in the .want file, for messages
}

func readWant(t *testing.T, path string) []wantProblem {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("every broken fixture needs a .want file: %v", err)
	}
	defer f.Close()
	var out []wantProblem
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		num, msg, ok := strings.Cut(s, ":")
		if !ok {
			t.Fatalf("%s:%d: want LINE: substring, got %q", path, n, s)
		}
		w := wantProblem{substr: strings.TrimSpace(msg), src: n}
		num, w.optional = strings.CutSuffix(num, "?")
		if w.line, err = strconv.Atoi(num); err != nil || w.substr == "" {
			t.Fatalf("%s:%d: want LINE: substring, got %q", path, n, s)
		}
		out = append(out, w)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// pastedSecrets are literal secrets some fixtures put where a reference
// belongs; no problem may quote them.
var pastedSecrets = []string{"hunter2"}

func TestBrokenConfigs(t *testing.T) {
	files, err := filepath.Glob("testdata/broken/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no fixtures: %v", err)
	}
	wants, _ := filepath.Glob("testdata/broken/*.want")
	for _, w := range wants {
		if _, err := os.Stat(strings.TrimSuffix(w, ".want") + ".yaml"); err != nil {
			t.Errorf("%s has no .yaml beside it", w)
		}
	}
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".yaml")
		t.Run(name, func(t *testing.T) {
			want := readWant(t, strings.TrimSuffix(path, ".yaml")+".want")
			ps := loadAndBuild(t, path)
			if len(ps) == 0 {
				t.Fatalf("%s was accepted", path)
			}
			checkSorted(t, ps)
			for _, p := range ps {
				if p.File != path {
					t.Errorf("problem names file %q, want %q", p.File, path)
				}
				if p.Line <= 0 {
					t.Errorf("problem has no line: %s", p.Error())
				}
				if got, exp := p.Error(), fmt.Sprintf("%s:%d: %s", path, p.Line, p.Msg); got != exp {
					t.Errorf("Error() = %q, want %q", got, exp)
				}
				for _, s := range pastedSecrets {
					mustNotContain(t, "problem", p.Error(), s)
				}
			}
			used := make([]bool, len(ps))
			for _, w := range want {
				found := false
				for i, p := range ps {
					if !used[i] && p.Line == w.line && containsInOrder(p.Msg, w.substr) {
						used[i], found = true, true
						break
					}
				}
				if !found && !w.optional {
					t.Errorf("missing problem (want line %d): %d: %s", w.src, w.line, w.substr)
				}
			}
			for i, p := range ps {
				if !used[i] {
					t.Errorf("unexpected problem: %d: %s", p.Line, p.Msg)
				}
			}
			if t.Failed() {
				t.Logf("all problems reported:\n%s", ps.Error())
			}
		})
	}
}

// containsInOrder reports whether msg contains every " ... "-separated part
// of want, in order.
func containsInOrder(msg, want string) bool {
	for _, part := range strings.Split(want, " ... ") {
		i := strings.Index(msg, part)
		if i < 0 {
			return false
		}
		msg = msg[i+len(part):]
	}
	return true
}
