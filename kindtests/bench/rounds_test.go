//go:build linux

package bench

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestRotation(t *testing.T) {
	dps := []string{"A", "B", "C", "D"}
	want := [][]string{
		{"A", "B", "C", "D"},
		{"B", "C", "D", "A"},
		{"C", "D", "A", "B"},
		{"D", "A", "B", "C"},
		{"A", "B", "C", "D"},
	}
	for r, w := range want {
		if got := rotation(dps, r); !slices.Equal(got, w) {
			t.Errorf("round %d: %v, want %v", r, got, w)
		}
	}
	// Over len rounds every item takes every position once.
	for _, dp := range dps {
		var slots []int
		for r := range dps {
			slots = append(slots, slices.Index(rotation(dps, r), dp))
		}
		slices.Sort(slots)
		if !slices.Equal(slots, []int{0, 1, 2, 3}) {
			t.Errorf("%s takes slots %v over 4 rounds", dp, slots)
		}
	}
	if !slices.Equal(dps, []string{"A", "B", "C", "D"}) {
		t.Errorf("rotation changed its input: %v", dps)
	}
	if got := rotation(nil, 3); len(got) != 0 {
		t.Errorf("empty: %v", got)
	}
	if got := rotation(NetpolDatapaths, 0); !slices.Equal(got, NetpolDatapaths) {
		t.Errorf("round 0 is not the column order: %v", got)
	}
}

func TestMedianRange(t *testing.T) {
	for _, c := range []struct {
		in          []float64
		med, lo, hi float64
		ok          bool
	}{
		{nil, 0, 0, 0, false},
		{[]float64{7}, 7, 7, 7, true},
		{[]float64{3, 1, 2}, 2, 1, 3, true},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4, true},
		{[]float64{5300, 4900, 5170, 5100, 5200}, 5170, 4900, 5300, true},
	} {
		in := slices.Clone(c.in)
		med, lo, hi, ok := medianRange(in)
		if med != c.med || lo != c.lo || hi != c.hi || ok != c.ok {
			t.Errorf("medianRange(%v) = %v %v %v %v, want %v %v %v %v", c.in, med, lo, hi, ok, c.med, c.lo, c.hi, c.ok)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("medianRange sorted its input: %v", in)
		}
	}
}

func rounds(vals ...float64) []NetpolSample {
	var ss []NetpolSample
	for i, v := range vals {
		ss = append(ss, NetpolSample{RoundSlot{Round: i}, NetpolNumbers{ConnPerSec: v, ConnP50us: v / 10, ConnP99us: v / 5, RRPerSec: 2 * v, RRus: 1e6 / (2 * v),
			FlowsPerSec: v + 1, FlowUs: 1e6 / (v + 1), ProgramSeconds: v / 1e5, Errors: 1}})
	}
	return ss
}

func TestAggregateNetpol(t *testing.T) {
	p := aggregateNetpol(NetpolEBPF, 10, rounds(5300, 4900, 5170, 5100, 5200))
	if p.NA != "" || p.Rounds != 5 || len(p.Samples) != 5 {
		t.Fatalf("point %+v", p)
	}
	if p.ConnPerSec != 5170 || p.RRPerSec != 10340 || p.FlowsPerSec != 5171 || p.ConnP50us != 517 || p.ProgramSeconds != 0.0517 || p.Errors != 5 {
		t.Errorf("medians %+v", p)
	}

	// A failed round is left out of the medians and counted.
	ss := rounds(100, 300, 200)
	ss[1].NA = "udp rr: timeout"
	p = aggregateNetpol(NetpolIptables, 10, ss)
	if p.NA != "" || p.Rounds != 2 || p.ConnPerSec != 150 {
		t.Errorf("partial: %+v", p)
	}
	if note := roundsNote(p.Rounds, len(p.Samples)); note != " [2/3 rounds]" {
		t.Errorf("rounds note %q", note)
	}

	// A round that did not enforce makes the whole cell n/a.
	ss = rounds(100, 300, 200)
	ss[2].NA = "not enforced: port 8082 reached the server"
	if p = aggregateNetpol(NetpolIpset, 10, ss); !strings.Contains(p.NA, "round 3: not enforced") {
		t.Errorf("enforcement failure: %+v", p)
	}
	ss = rounds(100)
	ss[0].NA = "client not allowed: timeout"
	if p = aggregateNetpol(NetpolIpset, 10, ss); !strings.Contains(p.NA, "client not allowed") {
		t.Errorf("client refused: %+v", p)
	}

	// No round with numbers: n/a with the first reason.
	ss = rounds(1, 2)
	ss[0].NA, ss[1].NA = "connections: refused", "udp rr: timeout"
	if p = aggregateNetpol(NetpolEBPF, 0, ss); p.NA != "round 1: connections: refused" {
		t.Errorf("all failed: %+v", p)
	}
}

func TestStatCell(t *testing.T) {
	p := aggregateNetpol(NetpolEBPF, 10, rounds(5300, 4900, 5170, 5100, 5200))
	if got := statCell(p.Samples, "%.0f", p.ConnPerSec, func(s NetpolSample) float64 { return s.ConnPerSec }); got != "5170 (4900–5300)" {
		t.Errorf("cell %q", got)
	}
	one := aggregateNetpol(NetpolEBPF, 10, rounds(5170))
	if got := statCell(one.Samples, "%.0f", one.ConnPerSec, func(s NetpolSample) float64 { return s.ConnPerSec }); got != "5170" {
		t.Errorf("one round: %q", got)
	}
	old := NetpolPoint{Datapath: NetpolEBPF, NetpolNumbers: NetpolNumbers{ConnPerSec: 5170}}
	if got := statCell(old.Samples, "%.0f", old.ConnPerSec, func(s NetpolSample) float64 { return s.ConnPerSec }); got != "5170" {
		t.Errorf("no samples: %q", got)
	}
}

func TestNetpolMarkdownRounds(t *testing.T) {
	r := &Results{NetpolDate: "2026-12-01T00:00:00Z", PolicyScales: []int{0, 1000}, NetpolConns: 3000,
		NetpolRRSeconds: 1.5, NetpolFlowsSeconds: 1.5, NetpolRounds: 5}
	for _, n := range r.PolicyScales {
		for i, dp := range NetpolDatapaths {
			base := float64(5000 + 100*i)
			r.Netpol = append(r.Netpol, aggregateNetpol(dp, n, rounds(base+130, base-270, base, base-70, base+30)))
		}
	}
	bad := rounds(1, 2, 3)
	bad[0].NA = "not enforced: port 8082 reached the server"
	r.Netpol[len(r.Netpol)-1] = aggregateNetpol(NetpolIpset, 1000, bad)
	var b strings.Builder
	r.netpolMarkdown(&b)
	md := b.String()
	checkMarkdown(t, md, []string{
		"- rounds: 5 per scale;",
		"(none ebpf iptables ipset, then ebpf iptables ipset none, ...)",
		"median over the rounds (min–max in parentheses)",
		"for 1.5 s, each from a new socket",
		"| metric | no policy | eBPF (ours) | iptables linear | ipset |",
		"| connections/s, 0 CIDRs | 5000 (4730–5130) | 5100 (4830–5230) | 5200 (4930–5330) | 5300 (5030–5430) |",
		"| connection p50 / p99 µs, 1k CIDRs | 500 (473–513) / 1000 (946–1026) |",
		"| UDP round trips/s, established flow, 0 CIDRs | 10000 (9460–10260) |",
		"| UDP new flows/s (fresh source port each), 1k CIDRs | 5001 (4731–5131) |",
		"| program time to first allowed connection, 0 CIDRs | — | 0.051 (0.048–0.052) s |",
		"| n/a (round 1: not enforced: port 8082 reached the server) |",
	}, nil)
	if rows := strings.Count(md, "\n| ") - 1; rows != 2*5 {
		t.Errorf("%d table rows, want 10 (5 per scale):\n%s", rows, md)
	}
}

// A bench.json written before rounds existed still loads (the Service rows
// it carries must survive a netpol-only run) and renders its single values.
func TestNetpolMarkdownOldResults(t *testing.T) {
	old := `{"policyScales":[10],"netpolConnectionsPerSample":5000,"netpolUDPRRSecondsPerSample":3,
	"netpol":[{"datapath":"ebpf","cidrs":10,"programSeconds":0.026,"connPerSec":4598,"connP50us":198.5,"connP99us":698.7,"udpRRPerSec":23460,"udpRRus":42.6}]}`
	var r Results
	if err := json.Unmarshal([]byte(old), &r); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	r.netpolMarkdown(&b)
	md := b.String()
	checkMarkdown(t, md, []string{"| connections/s, 10 CIDRs | — | 4598 |", "198.5 / 698.7", "| 23460 |", "| 0.026 s |"},
		[]string{"rounds:", "UDP new flows/s"})
}

func TestMeasureRounds(t *testing.T) {
	cols := []string{"a", "b", "c"}
	var order []string
	by, err := measureRounds(3, cols, func(r, slot int, col string) (ServiceSample, error) {
		order = append(order, col)
		return ServiceSample{RoundSlot: RoundSlot{Round: r, Slot: slot}}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(order, ""); got != "abcbcacab" {
		t.Errorf("measured in order %s, want abc bca cab", got)
	}
	for _, c := range cols {
		if len(by[c]) != 3 {
			t.Errorf("%s: %d samples, want 3", c, len(by[c]))
		}
		for r, s := range by[c] {
			if s.Round != r || s.Slot != slices.Index(rotation(cols, r), c) {
				t.Errorf("%s round %d: %+v", c, r, s)
			}
		}
	}
	stop := errors.New("interrupted")
	n := 0
	if _, err := measureRounds(3, cols, func(r, slot int, col string) (ServiceSample, error) {
		n++
		if n == 2 {
			return ServiceSample{}, stop
		}
		return ServiceSample{}, nil
	}); err != stop || n != 2 {
		t.Errorf("error after %d samples: %v, want stop after 2", n, err)
	}
}

func svcRounds(vals ...float64) []ServiceSample {
	var ss []ServiceSample
	for i, v := range vals {
		ss = append(ss, ServiceSample{RoundSlot{Round: i, Slot: i % 2}, ServiceNumbers{P50us: v, P99us: 2 * v, ConnPerSec: 1e6 / v, ProgramSeconds: v / 100, RSSKB: int64(v) * 1000, Errors: 1}})
	}
	return ss
}

func TestAggregatePoint(t *testing.T) {
	p := aggregatePoint(ModeSocklb, 10, svcRounds(20, 18, 25))
	if p.NA != "" || p.Rounds != 3 || len(p.Samples) != 3 || p.P50us != 20 || p.P99us != 40 || p.ConnPerSec != 50000 ||
		p.ProgramSeconds != 0.2 || p.RSSKB != 20000 || p.Errors != 3 {
		t.Errorf("point %+v", p)
	}
	ss := svcRounds(20, 18, 25)
	ss[0].NA = "not programmed within 10m0s"
	if p = aggregatePoint(ModeIptables, 10, ss); p.Rounds != 2 || p.P50us != 21.5 || roundsNote(p.Rounds, len(p.Samples)) != " [2/3 rounds]" {
		t.Errorf("partial: %+v", p)
	}
	ss[1].NA, ss[2].NA = "x", "y"
	if p = aggregatePoint(ModeIptables, 10, ss); p.NA != "round 1: not programmed within 10m0s" {
		t.Errorf("all failed: %+v", p)
	}
}

func TestServiceMarkdownRounds(t *testing.T) {
	r := &Results{Date: "2026-12-01T00:00:00Z", Machine: Machine{Host: "vm", CPUs: 2, CPUModel: "AMD EPYC 7B13", Kernel: "6.18.0",
		GoVersion: "go1.25.0", Revision: "abc123"}, Iptables: "iptables v1.8.11 (nf_tables)", Ipset: "ipset v7.23",
		KubeProxy: "Kubernetes v1.35.4", Etcd: "etcd Version: 3.5.16",
		Modes: []string{ModeDirect, ModeSocklb, ModeNftables}, Scales: []int{10}, LatCount: 5000, Rounds: 3,
		Bulk: map[string]Bulk{}}
	for i, m := range r.Modes {
		base := float64(10 + 10*i)
		r.Scale = append(r.Scale, aggregatePoint(m, 10, svcRounds(base, base-2, base+5)))
	}
	md := r.Markdown()
	checkMarkdown(t, md, []string{
		"- machine: vm, 2 CPUs (AMD EPYC 7B13)\n- kernel: 6.18.0\n",
		"- built from revision abc123 with go1.25.0; iptables v1.8.11 (nf_tables), ipset v7.23\n",
		"- Kubernetes v1.35.4 (kube-proxy's defaults, minSyncPeriod 1s; its iptables mode through iptables v1.8.11 (nf_tables)), etcd Version: 3.5.16 on tmpfs",
		"- rounds: 3 per scale;",
		"(direct socklb nftables, then socklb nftables direct, ...)",
		"| connect() p50 / p99 µs, 10 Services | 10.0 (8.0–15.0) / 20.0 (16.0–30.0) | 20.0 (18.0–25.0) / 40.0 (36.0–50.0) |",
		"| cold start to last Service answering, 10 Services | — | 0.20 (0.18–0.25) s | 0.30 (0.28–0.35) s |",
	}, []string{"v1.35.4 (defaults", "etcd 3.4", "(not recorded)"})
}

// The trace table's goal line: a row counts at its target only with none
// lost, all delivered, under one core and the target (nearly) reached.
func TestTraceMarkdownGoal(t *testing.T) {
	r := &TraceResults{Rows: []TraceRow{
		{Target: 50000, Achieved: 49990, Sent: 10, Delivered: 10, CPU: 0.4},
		{Target: 100000, Achieved: 99900, Sent: 10, Delivered: 10, CPU: 0.6},
		{Target: 200000, Achieved: 199000, Sent: 10, Delivered: 9, LostKern: 1, CPU: 0.8},
	}}
	if md := r.Markdown(); !strings.Contains(md, "**met**") || !strings.Contains(md, "under one core: 100000/s") {
		t.Errorf("goal line:\n%s", md)
	}
	r.Rows[1].LostSlow, r.Rows[1].Delivered = 1, 9
	if md := r.Markdown(); !strings.Contains(md, "**not met**") || !strings.Contains(md, "under one core: 50000/s") {
		t.Errorf("a loss at 100k must fail the goal:\n%s", md)
	}
	r.Rows[1].LostSlow, r.Rows[1].Delivered, r.Rows[1].CPU = 0, 10, 1.2
	if md := r.Markdown(); !strings.Contains(md, "**not met**") {
		t.Errorf("over one core must fail the goal:\n%s", md)
	}
}
