//go:build linux

package bench

import (
	"fmt"
	"slices"
	"strings"
)

// Both tables run R rounds per scale; each round measures every column once,
// in an order rotated per round, so slow drift of the machine hits all
// columns alike. A cell is the median over the rounds with the min–max range
// beside it.

// sample is one round of one column at one scale, in either table.
type sample interface {
	// na is why the round produced no numbers ("" when it did).
	na() string
	place() RoundSlot
	// errors counts the failed operations of the round.
	errors() int
}

func (r RoundSlot) place() RoundSlot { return r }

func (n NetpolNumbers) na() string   { return n.NA }
func (n ServiceNumbers) na() string  { return n.NA }
func (n L7Numbers) na() string       { return n.NA }
func (n NetpolNumbers) errors() int  { return n.Errors }
func (n ServiceNumbers) errors() int { return n.Errors }
func (n L7Numbers) errors() int      { return n.Errors }

// rotation is the column order of round r (0-based): items shifted left
// by r, so over len(items) rounds every item takes every position once.
func rotation(items []string, r int) []string {
	n := len(items)
	out := make([]string, 0, n)
	if n == 0 {
		return out
	}
	r %= n
	if r < 0 {
		r += n
	}
	out = append(out, items[r:]...)
	return append(out, items[:r]...)
}

// measureRounds runs rounds rounds over cols, each in rotation's order for
// that round, and returns the samples by column. measure gets the round and
// the slot (the column's position in that round); a non-nil error (the run
// was interrupted) stops at once.
func measureRounds[S sample](rounds int, cols []string, measure func(round, slot int, col string) (S, error)) (map[string][]S, error) {
	by := map[string][]S{}
	for r := range rounds {
		for slot, col := range rotation(cols, r) {
			s, err := measure(r, slot, col)
			if err != nil {
				return by, err
			}
			by[col] = append(by[col], s)
		}
	}
	return by, nil
}

// find is the first of ps that match accepts.
func find[P any](ps []P, match func(P) bool) (P, bool) {
	for _, p := range ps {
		if match(p) {
			return p, true
		}
	}
	var none P
	return none, false
}

// medianRange is the median (the mean of the middle two for an even count)
// and the minimum and maximum of xs; ok is false for no values.
func medianRange(xs []float64) (med, lo, hi float64, ok bool) {
	if len(xs) == 0 {
		return 0, 0, 0, false
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	med = s[m]
	if len(s)%2 == 0 {
		med = (s[m-1] + s[m]) / 2
	}
	return med, s[0], s[len(s)-1], true
}

// quantiles are the p50, p99 and maximum of xs (nearest rank below), which
// it sorts; zeros for none.
func quantiles(xs []float64) (p50, p99, maxv float64) {
	if len(xs) == 0 {
		return 0, 0, 0
	}
	slices.Sort(xs)
	return xs[len(xs)/2], xs[int(0.99*float64(len(xs)-1))], xs[len(xs)-1]
}

// okSamples are the rounds that produced numbers.
func okSamples[S sample](ss []S) []S {
	var out []S
	for _, s := range ss {
		if s.na() == "" {
			out = append(out, s)
		}
	}
	return out
}

func sampleValues[S any](ss []S, f func(S) float64) []float64 {
	out := make([]float64, 0, len(ss))
	for _, s := range ss {
		out = append(out, f(s))
	}
	return out
}

// medians sets every number of dst to the median of the same number (the
// same position in floats) over ss.
func medians[S any](dst []*float64, ss []S, floats func(*S) []*float64) {
	for i, d := range dst {
		*d = medianOf(ss, func(s S) float64 { return *floats(&s)[i] })
	}
}

// floats are the numbers of a policy measurement a median is taken of.
func (n *NetpolNumbers) floats() []*float64 {
	return []*float64{&n.ProgramSeconds, &n.ConnPerSec, &n.ConnP50us, &n.ConnP99us, &n.RRPerSec, &n.RRus, &n.FlowsPerSec, &n.FlowUs}
}

// floats are the numbers of a Service measurement a median is taken of
// (RSSKB, an integer, apart).
func (n *ServiceNumbers) floats() []*float64 {
	return []*float64{&n.ProgramSeconds, &n.P50us, &n.P99us, &n.ConnPerSec}
}

// medianOf is the median of one metric over ss.
func medianOf[S any](ss []S, f func(S) float64) float64 {
	m, _, _, _ := medianRange(sampleValues(ss, f))
	return m
}

// usable returns the rounds that produced numbers or, when none did, why
// not: "round k: why" for the first.
func usable[S sample](ss []S) (ok []S, na string) {
	if ok = okSamples(ss); len(ok) > 0 {
		return ok, ""
	}
	for _, s := range ss {
		if s.na() != "" {
			return nil, fmt.Sprintf("round %d: %s", s.place().Round+1, s.na())
		}
	}
	return nil, "no round produced numbers"
}

// enforcementFailure marks a round whose datapath let the denied port
// through or refused the client: its numbers measure a different rule set,
// so the whole cell is n/a rather than a median of the other rounds.
func enforcementFailure(na string) bool {
	return strings.HasPrefix(na, "not enforced") || strings.HasPrefix(na, "client not allowed")
}

// aggregateNetpol folds the rounds of one datapath at one scale into a
// point: every number is the median over the rounds that produced numbers,
// the rounds themselves stay in Samples (the ranges are read from there).
func aggregateNetpol(dp string, n int, ss []NetpolSample) NetpolPoint {
	p := NetpolPoint{Datapath: dp, CIDRs: n, Samples: ss}
	for _, s := range ss {
		if s.NA != "" && enforcementFailure(s.NA) {
			p.NA = fmt.Sprintf("round %d: %s", s.Round+1, s.NA)
			return p
		}
	}
	p.Rounds, p.Errors, p.NA = fold(ss, p.floats(), func(s *NetpolSample) []*float64 { return s.floats() })
	return p
}

// aggregatePoint folds the rounds of one Service datapath at one scale into
// a point, as aggregateNetpol does for the policy table.
func aggregatePoint(mode string, n int, ss []ServiceSample) Point {
	p := Point{Mode: mode, Services: n, Samples: ss}
	if p.Rounds, p.Errors, p.NA = fold(ss, p.floats(), func(s *ServiceSample) []*float64 { return s.floats() }); p.NA == "" {
		p.RSSKB = int64(medianOf(okSamples(ss), func(s ServiceSample) float64 { return float64(s.RSSKB) }))
	}
	return p
}

// fold sets every number of dst to its median over the rounds of ss that
// produced numbers (floats gives a round's numbers in dst's order) and
// returns how many did and the errors of all rounds, or, when none did, why
// not.
func fold[S sample](ss []S, dst []*float64, floats func(*S) []*float64) (rounds, errs int, na string) {
	ok, na := usable(ss)
	if na != "" {
		return 0, 0, na
	}
	medians(dst, ok, floats)
	for _, s := range ss {
		errs += s.errors()
	}
	return len(ok), errs, ""
}

// statCell renders the median of one metric and, when two or more rounds
// produced numbers, their range: "5170 (4900–5300)". A point without rounds
// (a bench.json from before rounds existed) renders its single value.
func statCell[S sample](ss []S, verb string, median float64, f func(S) float64) string {
	return withRange(verb, median, sampleValues(okSamples(ss), f))
}

// withRange renders median and, for two or more values xs, their range.
func withRange(verb string, median float64, xs []float64) string {
	v := fmt.Sprintf(verb, median)
	if len(xs) < 2 {
		return v
	}
	_, lo, hi, _ := medianRange(xs)
	return fmt.Sprintf("%s ("+verb+"–"+verb+")", v, lo, hi)
}

// roundsNote flags a cell whose median is over fewer rounds than were run.
func roundsNote(rounds, samples int) string {
	if samples == 0 || rounds == samples {
		return ""
	}
	return fmt.Sprintf(" [%d/%d rounds]", rounds, samples)
}
