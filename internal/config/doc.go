// Package config is the strict YAML schema, its validation and the
// composition root that turns a validated file into a running broker.
//
// Security contract:
//   - Unknown keys, wrong types, empty or truncated files are errors; every
//     problem is reported at once as "file:line: message" and nothing runs.
//   - Secrets appear only as references (env:NAME, file:PATH); the file
//     itself never holds a value, and no error quotes a resolved value.
//   - Defaults fail closed: rules deny by default, egress denies private
//     ranges, CONNECT is allowed to port 443 only, and a capability this
//     build does not have is an error rather than a silent no-op.
package config
