package trace

import (
	"container/heap"
	"slices"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// lineTime is when a line happened: the event's time, or when the agent
// noticed a loss.
func lineTime(l *apiv1.TraceLine) time.Time {
	switch {
	case l.Event != nil:
		return l.Event.Time
	case l.Lost != nil:
		return l.Lost.Time
	}
	return time.Time{}
}

// sortLines orders the lines of every node by time; equal times keep their
// arrival order (one node's own order).
func sortLines(lines []apiv1.TraceLine) {
	slices.SortStableFunc(lines, func(a, b apiv1.TraceLine) int { return lineTime(&a).Compare(lineTime(&b)) })
}

// lastEvents keeps the last n events of time-ordered lines (n <= 0: all)
// and every lost notice: a notice is never cut, it says what the output
// may be missing.
func lastEvents(lines []apiv1.TraceLine, n int) []apiv1.TraceLine {
	if n <= 0 {
		return lines
	}
	events := 0
	for i := range lines {
		if lines[i].Event != nil {
			events++
		}
	}
	drop := events - n
	if drop <= 0 {
		return lines
	}
	out := make([]apiv1.TraceLine, 0, len(lines)-drop)
	for _, l := range lines {
		if l.Event != nil && drop > 0 {
			drop--
			continue
		}
		out = append(out, l)
	}
	return out
}

// merger orders the lines of several live streams by time. Each node's
// stream is in its own time order but the streams interleave with network
// delay, so every line is held for the window after it arrived and the
// held lines leave smallest time first: a line arriving up to the window
// late still goes out in order. A line later than that goes out when it
// comes, out of order rather than dropped.
type merger struct {
	window time.Duration
	held   lineHeap
	// arrivals are the arrival times of the held lines, oldest first: each
	// one that is due releases the smallest held line, so no line waits
	// longer than the window.
	arrivals []time.Time
	seq      uint64
}

func newMerger(window time.Duration) *merger { return &merger{window: window} }

// push holds l, arrived at now.
func (m *merger) push(l apiv1.TraceLine, now time.Time) {
	m.seq++
	heap.Push(&m.held, heldLine{line: l, t: lineTime(&l), seq: m.seq})
	m.arrivals = append(m.arrivals, now)
}

// pop returns the lines due at now, in time order.
func (m *merger) pop(now time.Time) []apiv1.TraceLine {
	var out []apiv1.TraceLine
	for len(m.arrivals) > 0 && !m.arrivals[0].Add(m.window).After(now) {
		m.arrivals = m.arrivals[1:]
		out = append(out, heap.Pop(&m.held).(heldLine).line)
	}
	return out
}

// due is when the next line is due; false when none is held.
func (m *merger) due() (time.Time, bool) {
	if len(m.arrivals) == 0 {
		return time.Time{}, false
	}
	return m.arrivals[0].Add(m.window), true
}

// drain returns every held line in time order.
func (m *merger) drain() []apiv1.TraceLine {
	out := make([]apiv1.TraceLine, 0, m.held.Len())
	for m.held.Len() > 0 {
		out = append(out, heap.Pop(&m.held).(heldLine).line)
	}
	m.arrivals = nil
	return out
}

// trimHistory keeps, of the held lines older than cut, only the last n
// events (and every notice): --last N of a follow applies to the merged
// history of all nodes, which each sent their own last N.
func (m *merger) trimHistory(cut time.Time, n int) {
	if n <= 0 {
		return
	}
	var hist, rest []heldLine
	for _, h := range m.held {
		if h.t.Before(cut) {
			hist = append(hist, h)
		} else {
			rest = append(rest, h)
		}
	}
	slices.SortFunc(hist, heldLine.compare)
	lines := make([]apiv1.TraceLine, len(hist))
	for i := range hist {
		lines[i] = hist[i].line
	}
	kept := lastEvents(lines, n)
	dropped := len(hist) - len(kept)
	if dropped == 0 {
		return
	}
	m.held = m.held[:0]
	for i := range kept {
		m.seq++
		m.held = append(m.held, heldLine{line: kept[i], t: lineTime(&kept[i]), seq: m.seq})
	}
	m.held = append(m.held, rest...)
	heap.Init(&m.held)
	// The dropped lines' arrivals go too (the oldest ones: history came
	// first), so the count of arrivals stays the count of held lines.
	m.arrivals = m.arrivals[dropped:]
}

type heldLine struct {
	line apiv1.TraceLine
	t    time.Time
	seq  uint64
}

func (a heldLine) compare(b heldLine) int {
	if c := a.t.Compare(b.t); c != 0 {
		return c
	}
	switch {
	case a.seq < b.seq:
		return -1
	case a.seq > b.seq:
		return 1
	}
	return 0
}

type lineHeap []heldLine

func (h lineHeap) Len() int           { return len(h) }
func (h lineHeap) Less(i, j int) bool { return h[i].compare(h[j]) < 0 }
func (h lineHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *lineHeap) Push(x any)        { *h = append(*h, x.(heldLine)) }
func (h *lineHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
