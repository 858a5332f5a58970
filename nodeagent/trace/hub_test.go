package trace

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func newHub(t *testing.T, ring, queue int) (*Hub, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	h, err := NewHub(Options{Node: "n1", RingSize: ring, QueueSize: queue, Registerer: reg, Now: func() time.Time { return epoch }})
	if err != nil {
		t.Fatal(err)
	}
	return h, reg
}

// ev is event number i (its source port says which).
func ev(i int) apiv1.TraceEvent {
	e := deny()
	e.Source.Port = uint16(i)
	return e
}

// drain reads what is queued now, as short strings: "e<port>" for an
// event, "lost:<reason>:<count>" for a notice.
func drain(t *testing.T, s *Subscription) []string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // Next must not wait: only what is queued
	var out []string
	for {
		l, ok := s.Next(ctx)
		if !ok {
			return out
		}
		switch {
		case l.Event != nil && l.Lost == nil:
			out = append(out, fmt.Sprintf("e%d", l.Event.Source.Port))
		case l.Lost != nil && l.Event == nil:
			if l.Lost.Node != "n1" {
				t.Errorf("notice node %q", l.Lost.Node)
			}
			out = append(out, fmt.Sprintf("lost:%s:%d", l.Lost.Reason, l.Lost.Count))
		default:
			t.Fatalf("line with both or neither: %+v", l)
		}
	}
}

func lostMetric(h *Hub, reason string) float64 {
	return testutil.ToFloat64(h.lost.WithLabelValues(reason))
}

func TestSlowClientGetsNotice(t *testing.T) {
	h, _ := newHub(t, 100, 3)
	s := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer s.Close()
	for i := 1; i <= 5; i++ {
		h.Publish(ev(i)) // 4 and 5 find the queue full
	}
	// The notice goes where the loss happened, after the events that fit,
	// and does not displace any of them.
	if got, want := drain(t, s), []string{"e1", "e2", "e3", "lost:slow-client:2"}; !equal(got, want) {
		t.Fatalf("stream %v, want %v", got, want)
	}
	h.Publish(ev(6))
	if got, want := drain(t, s), []string{"e6"}; !equal(got, want) {
		t.Fatalf("after drain %v, want %v", got, want)
	}
	if got := lostMetric(h, apiv1.TraceLostSlowClient); got != 2 {
		t.Errorf("slow-client metric %v, want 2", got)
	}
}

func TestNoticeBeforeNextEvent(t *testing.T) {
	h, _ := newHub(t, 100, 2)
	s := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer s.Close()
	h.Publish(ev(1))
	h.Publish(ev(2))
	h.Publish(ev(3)) // lost
	ctx := context.Background()
	if l, _ := s.Next(ctx); l.Event == nil || l.Event.Source.Port != 1 {
		t.Fatalf("first line %+v", l)
	}
	h.Publish(ev(4)) // fits now: the notice of 3 goes before it
	if got, want := drain(t, s), []string{"e2", "lost:slow-client:1", "e4"}; !equal(got, want) {
		t.Fatalf("stream %v, want %v", got, want)
	}
}

func TestSlowClientDoesNotAffectOthers(t *testing.T) {
	h, _ := newHub(t, 100, 2)
	slow := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer slow.Close()
	fast := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer fast.Close()
	var fastGot []string
	for i := 1; i <= 6; i++ {
		h.Publish(ev(i))
		fastGot = append(fastGot, drain(t, fast)...)
	}
	if want := []string{"e1", "e2", "e3", "e4", "e5", "e6"}; !equal(fastGot, want) {
		t.Errorf("fast client %v, want %v", fastGot, want)
	}
	if got, want := drain(t, slow), []string{"e1", "e2", "lost:slow-client:4"}; !equal(got, want) {
		t.Errorf("slow client %v, want %v", got, want)
	}
}

func TestFilterBeforeQueue(t *testing.T) {
	h, _ := newHub(t, 100, 1)
	s := h.Subscribe(apiv1.TraceQuery{Follow: true, TraceFilter: apiv1.TraceFilter{Verdicts: []string{apiv1.TraceVerdictAllowed}}})
	defer s.Close()
	allowed := ev(9)
	allowed.Verdict = apiv1.TraceVerdictAllowed
	for i := 1; i <= 5; i++ {
		h.Publish(ev(i)) // denied: filtered out, must not fill the queue
	}
	h.Publish(allowed)
	if got, want := drain(t, s), []string{"e9"}; !equal(got, want) {
		t.Fatalf("stream %v, want %v", got, want)
	}
	if got := lostMetric(h, apiv1.TraceLostSlowClient); got != 0 {
		t.Errorf("filtered events counted lost: %v", got)
	}
}

func TestKernelLossInStream(t *testing.T) {
	h, _ := newHub(t, 100, 10)
	s := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer s.Close()
	h.Publish(ev(1))
	h.Lost(apiv1.TraceLostKernel, apiv1.TraceTypePolicy, 7)
	h.Lost(apiv1.TraceLostKernel, apiv1.TraceTypePolicy, 3)
	h.Publish(ev(2))
	if got, want := drain(t, s), []string{"e1", "lost:kernel-buffer-full:10", "e2"}; !equal(got, want) {
		t.Fatalf("stream %v, want %v", got, want)
	}
	if got := lostMetric(h, apiv1.TraceLostKernel); got != 10 {
		t.Errorf("kernel metric %v, want 10", got)
	}
}

func TestHistory(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ring      int
		published int
		q         apiv1.TraceQuery
		want      []string
	}{
		{"all kept", 5, 3, apiv1.TraceQuery{}, []string{"e1", "e2", "e3"}},
		{"last of kept", 5, 3, apiv1.TraceQuery{Last: 2}, []string{"e2", "e3"}},
		{"ring overran, all asked", 3, 5, apiv1.TraceQuery{}, []string{"lost:agent-buffer-overrun:2", "e3", "e4", "e5"}},
		{"ring overran, last fits", 3, 5, apiv1.TraceQuery{Last: 3}, []string{"e3", "e4", "e5"}},
		{"ring overran, last more than kept", 3, 5, apiv1.TraceQuery{Last: 4}, []string{"lost:agent-buffer-overrun:1", "e3", "e4", "e5"}},
		{"follow without last: no history", 3, 5, apiv1.TraceQuery{Follow: true}, nil},
		{"follow with last", 3, 5, apiv1.TraceQuery{Follow: true, Last: 1}, []string{"e5"}},
		{"filter applies to history", 5, 3, apiv1.TraceQuery{TraceFilter: apiv1.TraceFilter{Ports: []uint16{2}}}, []string{"e2"}},
		// Event i happened at epoch+i seconds.
		{"since cuts by time", 5, 4, apiv1.TraceQuery{Since: epoch.Add(3 * time.Second)}, []string{"e3", "e4"}},
		{"since and last", 5, 4, apiv1.TraceQuery{Since: epoch.Add(2 * time.Second), Last: 2}, []string{"e3", "e4"}},
		{"since after every evicted event: nothing missed", 3, 5, apiv1.TraceQuery{Since: epoch.Add(3 * time.Second)}, []string{"e3", "e4", "e5"}},
		{"since at an evicted event: missed", 3, 5, apiv1.TraceQuery{Since: epoch.Add(2 * time.Second)}, []string{"lost:agent-buffer-overrun:2", "e3", "e4", "e5"}},
		{"follow: since cuts the history", 5, 4, apiv1.TraceQuery{Follow: true, Last: 3, Since: epoch.Add(4 * time.Second)}, []string{"e4"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := newHub(t, tc.ring, 10)
			for i := 1; i <= tc.published; i++ {
				e := ev(i)
				e.Time = epoch.Add(time.Duration(i) * time.Second)
				h.Publish(e)
			}
			s := h.Subscribe(tc.q)
			defer s.Close()
			if got := drain(t, s); !equal(got, tc.want) {
				t.Fatalf("history %v, want %v", got, tc.want)
			}
		})
	}
}

func TestMetricsRegistered(t *testing.T) {
	h, reg := newHub(t, 10, 10)
	h.Publish(ev(1))
	n, err := testutil.GatherAndCount(reg, "kebpf_trace_events_lost_total", "kebpf_trace_events_total", "kebpf_trace_clients")
	if err != nil {
		t.Fatal(err)
	}
	if n != 5 { // 3 lost reasons, 1 type, 1 gauge
		t.Errorf("%d series, want 5", n)
	}
}

func TestHandler(t *testing.T) {
	h, _ := newHub(t, 10, 10)
	h.Publish(ev(1))
	h.Publish(ev(2))
	srv := httptest.NewServer(h.Handler())
	defer srv.Close()

	t.Run("bad query", func(t *testing.T) {
		resp, err := http.Get(srv.URL + "?verdict=DROPPED")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %d, want 400", resp.StatusCode)
		}
	})
	t.Run("history", func(t *testing.T) {
		resp, err := http.Get(srv.URL + "?port=2")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		lines := readLines(t, bufio.NewScanner(resp.Body), -1)
		if len(lines) != 1 || lines[0].Event == nil || lines[0].Event.Source.Port != 2 {
			t.Fatalf("lines %+v", lines)
		}
	})
	t.Run("follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"?follow=1&last=1", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		if l := readLines(t, sc, 1); l[0].Event.Source.Port != 2 {
			t.Fatalf("history line %+v", l[0])
		}
		// The response headers came back, so the subscription exists.
		h.Publish(ev(3))
		if l := readLines(t, sc, 1); l[0].Event.Source.Port != 3 {
			t.Fatalf("followed line %+v", l[0])
		}
		cancel()
	})
}

// readLines decodes n lines (-1: to EOF).
func readLines(t *testing.T, sc *bufio.Scanner, n int) []apiv1.TraceLine {
	t.Helper()
	var out []apiv1.TraceLine
	for n < 0 || len(out) < n {
		if !sc.Scan() {
			if n >= 0 {
				t.Fatalf("stream ended after %d lines: %v", len(out), sc.Err())
			}
			break
		}
		var l apiv1.TraceLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		if strings.Contains(sc.Text(), "\n") {
			t.Fatalf("line has a newline")
		}
		out = append(out, l)
	}
	return out
}

func equal(a, b []string) bool {
	return strings.Join(a, " ") == strings.Join(b, " ")
}

// BenchmarkPublish: the agent-side cost of one event, from Publish to a
// following client's Next (JSON encoding excluded), with clients whose
// filter matches it or not.
func BenchmarkPublish(b *testing.B) {
	for _, bc := range []struct {
		name              string
		matching, nomatch int
	}{{"no clients", 0, 0}, {"1 client", 1, 0}, {"1 client + 8 filtered out", 1, 8}} {
		b.Run(bc.name, func(b *testing.B) {
			h, err := NewHub(Options{Node: "n1", QueueSize: 1 << 16})
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var done []chan int
			for range bc.matching {
				s := h.Subscribe(apiv1.TraceQuery{Follow: true})
				defer s.Close()
				d := make(chan int, 1)
				done = append(done, d)
				go func() {
					n := 0
					for {
						if _, ok := s.Next(ctx); !ok {
							d <- n
							return
						}
						n++
					}
				}()
			}
			for range bc.nomatch {
				s := h.Subscribe(apiv1.TraceQuery{Follow: true, TraceFilter: apiv1.TraceFilter{Namespaces: []string{"other"}}})
				defer s.Close()
			}
			e := deny()
			b.ResetTimer()
			for b.Loop() {
				h.Publish(e)
			}
			b.StopTimer()
			cancel()
			for _, d := range done {
				<-d
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
			b.ReportMetric(testutil.ToFloat64(h.lost.WithLabelValues(apiv1.TraceLostSlowClient)), "lost")
		})
	}
}

// deny is a denied policy event between two pods.
func deny() apiv1.TraceEvent {
	return apiv1.TraceEvent{
		Node: "n1", Type: apiv1.TraceTypePolicy, Verdict: apiv1.TraceVerdictDenied, Protocol: "TCP",
		Source:      apiv1.TracePeer{Namespace: "a", Pod: "client", IP: "10.0.0.1", Port: 40000},
		Destination: apiv1.TracePeer{Namespace: "b", Pod: "server", IP: "10.0.0.2", Port: 80},
	}
}

// Stats count what the metrics count, per type and per reason, and agree
// with them.
func TestStats(t *testing.T) {
	h, reg := newHub(t, 2, 1)
	if st := h.Stats(); len(st.Published) != 0 || len(st.Lost) != 0 {
		t.Fatalf("fresh hub: %+v", st)
	}
	s := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer s.Close()
	for i := range 3 {
		h.Publish(ev(i)) // queue of 1: two slow-client losses
	}
	h.Lost(apiv1.TraceLostKernel, apiv1.TraceTypePolicy, 5)
	h.Subscribe(apiv1.TraceQuery{}).Close() // history wants 3, ring kept 2: 1 overrun
	st := h.Stats()
	want := Stats{Published: map[string]uint64{apiv1.TraceTypePolicy: 3},
		Lost: map[string]uint64{apiv1.TraceLostSlowClient: 2, apiv1.TraceLostKernel: 5, apiv1.TraceLostAgent: 1}}
	if fmt.Sprint(st) != fmt.Sprint(want) {
		t.Errorf("stats %+v, want %+v", st, want)
	}
	for r, n := range st.Lost {
		if m := testutil.ToFloat64(h.lost.WithLabelValues(r)); m != float64(n) {
			t.Errorf("lost %s: stats %d, metric %v", r, n, m)
		}
	}
	_ = reg
}
