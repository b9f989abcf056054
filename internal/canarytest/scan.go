package canarytest

import "bytes"

// matcher finds many needles in one pass: a rolling hash over the first
// minNeedle bytes of each position, a bit table as a cheap filter, and a
// map from those first bytes to the needles that start with them. Cost is
// linear in the data whatever the number of canaries.
type matcher struct {
	bits   []uint64
	prefix map[string][]needle
}

type needle struct {
	text  string
	label string
}

const (
	hashBase  = 1099511628211
	tableBits = 22
)

// basePow is hashBase^(minNeedle-1), to drop the byte leaving the window.
var basePow = func() uint64 {
	p := uint64(1)
	for i := 0; i < minNeedle-1; i++ {
		p *= hashBase
	}
	return p
}()

func newMatcher() *matcher {
	return &matcher{bits: make([]uint64, (1<<tableBits)/64), prefix: map[string][]needle{}}
}

func windowHash(b []byte) uint64 {
	var h uint64
	for _, c := range b[:minNeedle] {
		h = h*hashBase + uint64(c)
	}
	return h
}

func slot(h uint64) (int, uint64) {
	i := h >> (64 - tableBits)
	return int(i / 64), 1 << (i % 64)
}

func (m *matcher) add(n needle) {
	p := n.text[:minNeedle]
	for _, old := range m.prefix[p] {
		if old == n {
			return
		}
	}
	m.prefix[p] = append(m.prefix[p], n)
	w, bit := slot(windowHash([]byte(p)))
	m.bits[w] |= bit
}

// find calls hit for every needle found in data (possibly more than once
// for one needle).
func (m *matcher) find(data []byte, hit func(needle)) {
	if len(data) < minNeedle || len(m.prefix) == 0 {
		return
	}
	h := windowHash(data)
	for i := 0; ; i++ {
		w, bit := slot(h)
		if m.bits[w]&bit != 0 {
			for _, n := range m.prefix[string(data[i:i+minNeedle])] {
				if bytes.HasPrefix(data[i:], []byte(n.text)) {
					hit(n)
				}
			}
		}
		if i+minNeedle >= len(data) {
			return
		}
		h = (h-uint64(data[i])*basePow)*hashBase + uint64(data[i+minNeedle])
	}
}
