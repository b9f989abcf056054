package broker

// PanicKind names what a recovered panic value is ("error", "string" or
// "other") without its content: a panic value can hold anything, a
// credential included, so it is never logged, only its kind (with a stack,
// which prints argument words, not the strings they point to).
func PanicKind(v any) string {
	switch v.(type) {
	case error:
		return "error"
	case string:
		return "string"
	}
	return "other"
}
