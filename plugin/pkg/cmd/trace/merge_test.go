package trace

import (
	"fmt"
	"strings"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

var t0 = time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)

// at is an event of node at t0+ms milliseconds.
func at(node string, ms int) apiv1.TraceLine {
	return apiv1.TraceLine{Event: &apiv1.TraceEvent{Time: t0.Add(time.Duration(ms) * time.Millisecond), Node: node}}
}

func lostAt(node string, ms int, n uint64) apiv1.TraceLine {
	return apiv1.TraceLine{Lost: &apiv1.TraceLost{Time: t0.Add(time.Duration(ms) * time.Millisecond), Node: node, Reason: apiv1.TraceLostKernel, Count: n}}
}

func names(lines []apiv1.TraceLine) string {
	var out []string
	for _, l := range lines {
		if l.Event != nil {
			out = append(out, fmt.Sprintf("%s@%d", l.Event.Node, l.Event.Time.Sub(t0).Milliseconds()))
		} else {
			out = append(out, fmt.Sprintf("lost:%s@%d", l.Lost.Node, l.Lost.Time.Sub(t0).Milliseconds()))
		}
	}
	return strings.Join(out, " ")
}

func TestSortAndLast(t *testing.T) {
	lines := []apiv1.TraceLine{at("a", 30), at("a", 10), lostAt("b", 5, 3), at("b", 20), at("b", 10)}
	sortLines(lines)
	if got, want := names(lines), "lost:b@5 a@10 b@10 a@30 b@20"; got == want {
		t.Fatalf("sorted wrong: %s", got)
	}
	if got, want := names(lines), "lost:b@5 a@10 b@10 b@20 a@30"; got != want {
		t.Fatalf("sorted %q, want %q (equal times keep arrival order)", got, want)
	}
	for _, tc := range []struct {
		n    int
		want string
	}{
		{0, "lost:b@5 a@10 b@10 b@20 a@30"},
		{2, "lost:b@5 b@20 a@30"}, // the notice is never cut
		{4, "lost:b@5 a@10 b@10 b@20 a@30"},
		{9, "lost:b@5 a@10 b@10 b@20 a@30"},
	} {
		if got := names(lastEvents(lines, tc.n)); got != tc.want {
			t.Errorf("last %d: %q, want %q", tc.n, got, tc.want)
		}
	}
}

// TestMergerWindow: lines held for the window leave in time order; a line
// later than the window goes out when it comes, not dropped.
func TestMergerWindow(t *testing.T) {
	w := 250 * time.Millisecond
	m := newMerger(w)
	now := t0
	step := func(d time.Duration) string {
		now = now.Add(d)
		return names(m.pop(now))
	}
	m.push(at("a", 100), now)
	if got := step(100 * time.Millisecond); got != "" {
		t.Fatalf("released before the window: %s", got)
	}
	m.push(at("b", 50), now) // b's older event arrives 100ms later
	if d, ok := m.due(); !ok || !d.Equal(t0.Add(w)) {
		t.Fatalf("due %v %v, want %v", d, ok, t0.Add(w))
	}
	// At t0+250 a's arrival is due: the smallest held line (b@50) leaves.
	if got := step(150 * time.Millisecond); got != "b@50" {
		t.Fatalf("at +250: %q, want b@50", got)
	}
	if got := step(100 * time.Millisecond); got != "a@100" {
		t.Fatalf("at +350: %q, want a@100", got)
	}
	// Far too late: still printed.
	m.push(at("c", 10), now)
	if got := step(w); got != "c@10" {
		t.Fatalf("late line: %q", got)
	}
	if _, ok := m.due(); ok {
		t.Fatal("nothing held, yet due")
	}
	m.push(at("a", 900), now)
	m.push(at("b", 800), now)
	if got := names(m.drain()); got != "b@800 a@900" {
		t.Fatalf("drain %q", got)
	}
}

// TestMergerInterleaves: two nodes' streams, each in order, arriving with
// random delays below the window, come out in global time order.
func TestMergerInterleaves(t *testing.T) {
	m := newMerger(250 * time.Millisecond)
	type arrival struct {
		line  apiv1.TraceLine
		delay int // ms after the event time
	}
	var in []arrival
	for i := 0; i < 50; i++ {
		in = append(in, arrival{at("a", i*20), (i * 37) % 200}, arrival{at("b", i*20+7), (i * 53) % 240})
	}
	// Feed in arrival order, popping as the clock passes.
	var out []apiv1.TraceLine
	for clock := 0; clock <= 2000; clock++ {
		now := t0.Add(time.Duration(clock) * time.Millisecond)
		for _, a := range in {
			if int(a.line.Event.Time.Sub(t0).Milliseconds())+a.delay == clock {
				m.push(a.line, now)
			}
		}
		out = append(out, m.pop(now)...)
	}
	out = append(out, m.drain()...)
	if len(out) != 100 {
		t.Fatalf("%d lines out, want 100", len(out))
	}
	for i := 1; i < len(out); i++ {
		if out[i].Event.Time.Before(out[i-1].Event.Time) {
			t.Fatalf("out of order at %d: %s", i, names(out[i-1:i+1]))
		}
	}
}

func TestMergerTrimHistory(t *testing.T) {
	m := newMerger(time.Second)
	for _, l := range []apiv1.TraceLine{at("a", 1), at("a", 2), at("a", 3), at("b", 1), lostAt("b", 2, 1), at("b", 4), at("a", 500)} {
		m.push(l, t0)
	}
	// History is what happened before +100 (the connect); keep the last 2
	// of it across nodes.
	m.trimHistory(t0.Add(100*time.Millisecond), 2)
	if got, want := names(m.pop(t0.Add(time.Second))), "lost:b@2 a@3 b@4 a@500"; got != want {
		t.Fatalf("after trim: %q, want %q", got, want)
	}
	if m.held.Len() != 0 || len(m.arrivals) != 0 {
		t.Fatalf("left %d held, %d arrivals", m.held.Len(), len(m.arrivals))
	}
}
