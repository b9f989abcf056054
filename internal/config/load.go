package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Problem is one thing wrong with a config file.
type Problem struct {
	File string
	Line int
	Msg  string
}

func (p Problem) Error() string {
	if p.Line > 0 {
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
	}
	return fmt.Sprintf("%s: %s", p.File, p.Msg)
}

// Problems is every problem found, sorted by line.
type Problems []Problem

func (ps Problems) Error() string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.Error()
	}
	return strings.Join(s, "\n")
}

// Config is a decoded file with what is needed to report positions and to
// resolve relative paths.
type Config struct {
	File
	Path string // for messages
	Dir  string // relative paths in the file resolve against it
	root *yaml.Node
	// decodeProblems are unknown keys and wrong types, reported by validate
	// together with everything else.
	decodeProblems Problems
	// embedded marks the built-in quick start: there is no file to reload.
	embedded bool
}

// ParseEmbedded is Parse for a config compiled into the binary.
func ParseEmbedded(name, dir string, data []byte) (*Config, error) {
	c, err := Parse(name, dir, data)
	if c != nil {
		c.embedded = true
	}
	return c, err
}

var quotedValue = regexp.MustCompile("cannot unmarshal (!!\\w+) `[^`]*` into")

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// LoadFile reads and decodes path. Relative paths in it resolve against
// its directory.
func LoadFile(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, Problems{{File: path, Msg: fmt.Sprintf("cannot read: %v", errors.Unwrap(err))}}
	}
	return Parse(path, filepath.Dir(path), data)
}

// Parse decodes data strictly. Every decoding problem is returned at once.
func Parse(name, dir string, data []byte) (*Config, error) {
	c := &Config{Path: name, Dir: dir}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, Problems{{File: name, Line: 1, Msg: "the config is empty"}}
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, c.yamlProblems(err)
	}
	if root.Kind == 0 || (root.Kind == yaml.DocumentNode && (len(root.Content) == 0 || root.Content[0].Kind == 0)) {
		return nil, Problems{{File: name, Line: 1, Msg: "the config is empty"}}
	}
	c.root = &root
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c.File); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, c.yamlProblems(err)
		}
		// Type errors leave the rest decoded: keep them and go on, so
		// validate reports every problem in the file at once.
		c.decodeProblems = c.yamlProblems(err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, Problems{{File: name, Line: extra.Line, Msg: "more than one YAML document; keygate reads exactly one"}}
	}
	return c, nil
}

func (c *Config) yamlProblems(err error) Problems {
	return YAMLProblems(c.Path, err, strings.NewReplacer(" in type config.", " in "))
}

// YAMLProblems turns a yaml.v3 error into Problems of file, sorted by line.
// names rewrites Go type names in messages into the file's own words. A
// mistyped value that yaml.v3 quotes is never repeated: it may be a secret
// pasted where a reference belongs.
func YAMLProblems(file string, err error, names *strings.Replacer) Problems {
	var msgs []string
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	} else {
		msgs = []string{err.Error()}
	}
	ps := make(Problems, 0, len(msgs))
	for _, m := range msgs {
		p := Problem{File: file, Msg: m}
		if sm := yamlLine.FindStringSubmatch(m); sm != nil {
			p.Line, _ = strconv.Atoi(sm[1])
			p.Msg = sm[2]
		}
		p.Msg = names.Replace(p.Msg)
		p.Msg = quotedValue.ReplaceAllString(p.Msg, "cannot unmarshal $1 value into")
		ps = append(ps, p)
	}
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
	return ps
}

// line finds the line of a node of this file by path (see NodeLine).
func (c *Config) line(path ...any) int {
	if c.root == nil {
		return 0
	}
	return NodeLine(c.root, path...)
}

// NodeLine finds the line of a YAML node by path: string keys and int
// indexes. It returns the deepest line found, so a message still points near
// the problem when the exact key is absent.
func NodeLine(n *yaml.Node, path ...any) int {
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	best := n.Line
	for _, el := range path {
		var next *yaml.Node
		switch k := el.(type) {
		case string:
			if n.Kind != yaml.MappingNode {
				return best
			}
			for i := 0; i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == k {
					next = n.Content[i+1]
					if next.Kind == yaml.ScalarNode || next.Kind == yaml.AliasNode {
						best = next.Line
					} else {
						best = n.Content[i].Line
					}
					break
				}
			}
		case int:
			if n.Kind != yaml.SequenceNode || k >= len(n.Content) {
				return best
			}
			next = n.Content[k]
			best = next.Line
		}
		if next == nil {
			return best
		}
		n = next
	}
	return best
}

// problem builds a Problem located at path.
func (c *Config) problem(msg string, path ...any) Problem {
	return Problem{File: c.Path, Line: c.line(path...), Msg: msg}
}

// resolvePath makes a config-relative path absolute.
func (c *Config) resolvePath(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.Dir, p)
}
