//go:build linux

package bench

import (
	"fmt"
	"slices"
	"strings"
)

// The NetworkPolicy bench runs R rounds per scale; each round measures every
// datapath once, in an order rotated per round, so slow drift of the machine
// hits all columns alike. A cell is the median over the rounds with the
// min–max range beside it.

// rotation is the datapath order of round r (0-based): items shifted left
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

// okSamples are the rounds that produced numbers.
func okSamples(ss []NetpolSample) []NetpolSample {
	var out []NetpolSample
	for _, s := range ss {
		if s.NA == "" {
			out = append(out, s)
		}
	}
	return out
}

func sampleValues(ss []NetpolSample, f func(NetpolSample) float64) []float64 {
	out := make([]float64, 0, len(ss))
	for _, s := range ss {
		out = append(out, f(s))
	}
	return out
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
	ok := okSamples(ss)
	p.Rounds = len(ok)
	if len(ok) == 0 {
		p.NA = "no round produced numbers"
		for _, s := range ss {
			if s.NA != "" {
				p.NA = fmt.Sprintf("round %d: %s", s.Round+1, s.NA)
				break
			}
		}
		return p
	}
	med := func(f func(NetpolSample) float64) float64 {
		m, _, _, _ := medianRange(sampleValues(ok, f))
		return m
	}
	p.ProgramSeconds = med(func(s NetpolSample) float64 { return s.ProgramSeconds })
	p.ConnPerSec = med(func(s NetpolSample) float64 { return s.ConnPerSec })
	p.ConnP50us = med(func(s NetpolSample) float64 { return s.ConnP50us })
	p.ConnP99us = med(func(s NetpolSample) float64 { return s.ConnP99us })
	p.RRPerSec = med(func(s NetpolSample) float64 { return s.RRPerSec })
	p.RRus = med(func(s NetpolSample) float64 { return s.RRus })
	p.FlowsPerSec = med(func(s NetpolSample) float64 { return s.FlowsPerSec })
	p.FlowUs = med(func(s NetpolSample) float64 { return s.FlowUs })
	for _, s := range ss {
		p.Errors += s.Errors
	}
	return p
}

// statCell renders the median of one metric and, when the point has two or
// more rounds, their range: "5170 (4900–5300)". A point without rounds (a
// bench.json from before rounds existed) renders its single value.
func statCell(p NetpolPoint, verb string, median float64, f func(NetpolSample) float64) string {
	v := fmt.Sprintf(verb, median)
	ok := okSamples(p.Samples)
	if len(ok) < 2 {
		return v
	}
	_, lo, hi, _ := medianRange(sampleValues(ok, f))
	return fmt.Sprintf("%s ("+verb+"–"+verb+")", v, lo, hi)
}

// roundsNote flags a cell whose median is over fewer rounds than were run.
func roundsNote(p NetpolPoint) string {
	if len(p.Samples) == 0 || p.Rounds == len(p.Samples) {
		return ""
	}
	return fmt.Sprintf(" [%d/%d rounds]", p.Rounds, len(p.Samples))
}
