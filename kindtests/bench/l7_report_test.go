//go:build linux

package bench

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// l7Rounds are rounds of one column: p50 = v, p99 = 2v, 1e6/v requests/s.
func l7Rounds(vals ...float64) []L7Sample {
	var ss []L7Sample
	for i, v := range vals {
		ss = append(ss, L7Sample{RoundSlot{Round: i}, L7Numbers{P50us: v, P99us: 2 * v, ReqPerSec: 1e6 / v}})
	}
	return ss
}

// The added latency and the goal pair each column with (a) of the same
// round, and a round where any column is n/a is left out of both.
func TestL7MarkdownAddedAndGoal(t *testing.T) {
	l := &L7Results{Date: "2026-12-01T00:00:00Z", Machine: Machine{Host: "vm", CPUs: 2, CPUModel: "Xeon", Kernel: "6.18.44", GoVersion: "go1.26.8", Revision: "abc123"}, Envoy: "Envoy x/1.40.0/Clean/RELEASE/BoringSSL", Iptables: "iptables v1.8.9 (nf_tables)", Rounds: 3, SampleSeconds: 3, Conns: []int{1, 8},
		Changes: L7Changes{Changes: 50, AckP50ms: 2.04, AckP99ms: 5.5, EnforceP50ms: 3.1, EnforceP99ms: 7.25}, RSSIdleKB: 65 * 1024, RSSLoadKB: 70 * 1024}
	// 1 connection: added (b) 60, 70, 50; added (c) 100, 100, 100: 40%, 30%, 50% below.
	l.Points = append(l.Points,
		aggregateL7(L7Direct, 1, l7Rounds(20, 30, 10)),
		aggregateL7(L7Sockmap, 1, l7Rounds(80, 100, 60)),
		aggregateL7(L7Redirect, 1, l7Rounds(120, 130, 110)))
	// 8 connections: round 2 of (c) failed; rounds 1 and 3: (b) adds 90 and
	// 95, (c) 100 and 95: 10% and 0% below.
	bad := l7Rounds(200, 300, 200)
	bad[1].NA = "not through REDIRECT: 0 Envoy connections for 8 clients"
	l.Points = append(l.Points,
		aggregateL7(L7Direct, 8, l7Rounds(100, 100, 105)),
		aggregateL7(L7Sockmap, 8, l7Rounds(190, 1, 200)),
		aggregateL7(L7Redirect, 8, bad))
	r := &Results{L7: l}
	md := r.Markdown()
	checkMarkdown(t, md, []string{
		"## L7: HTTP through the node-local Envoy (issue 9)\n\n- date: 2026-12-01T00:00:00Z; machine: vm, 2 CPUs (Xeon); kernel 6.18.44; built from revision abc123 with go1.26.8\n",
		"Envoy x/1.40.0/Clean/RELEASE/BoringSSL",
		"(an iptables sidecar's path; iptables v1.8.9 (nf_tables))",
		"- rounds: 3 per number of connections;",
		"(direct sockmap redirect, then sockmap redirect direct, ...)",
		"| metric | (a) direct, no proxy | (b) Envoy via bpf/sockmap (sk_msg, ours) | (c) Envoy via iptables REDIRECT (TCP) |",
		"| request p50 / p99 µs, 1 connection | 20 (10–30) / 40 (20–60) | 80 (60–100) / 160 (120–200) | 120 (110–130) / 240 (220–260) |",
		"| requests/s, 8 connections | 10000 (9524–10000) |",
		"| added over (a), p50 / p99 µs, 1 connection | — | 60 (50–70) / 120 (100–140) | 100 (100–100) / 200 (200–200) |",
		"| added over (a), p50 / p99 µs, 8 connections | — | 92 (90–95) / 185 (180–190) | 98 (95–100) / 195 (190–200) |",
		"[2/3 rounds]",
		"| L7Policy change to Envoy's ACK, p50 / p99 ms (50 changes) | — | 2.0 / 5.5 | — |",
		"| L7Policy change to new verdict on a new connection, p50 / p99 ms (50 changes) | — | 3.1 / 7.2 | — |",
		"| Envoy RSS idle / after the load | — | 65.0 / 70.0 MB | (the same process) |",
		"- 1 connection: p50 40 (30–50)% → met; p99 40 (30–50)% → met",
		"- 8 connections: p50 5 (0–10)% → not met; p99 5 (0–10)% → not met",
	}, nil)
}

// An l7-only run keeps the Service and policy tables of the previous
// bench.json with their metadata, and a run without l7 keeps its L7 table.
func TestL7CarryOver(t *testing.T) {
	dir := t.TempDir()
	then := Machine{Host: "vm", Kernel: "6.18.44-fc-v657", CPUs: 2, CPUModel: "AMD EPYC"}
	prev := Results{Machine: then, Iptables: "iptables v1.8.11", Modes: []string{ModeDirect}, Scales: []int{10}, Scale: []Point{{Mode: ModeDirect, Services: 10}},
		PolicyScales: []int{0}, Netpol: []NetpolPoint{{Datapath: NetpolEBPF}}, L7: &L7Results{Date: "then", Conns: []int{1}}}
	b, _ := json.Marshal(prev)
	if err := os.WriteFile(filepath.Join(dir, "bench.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	l7Only := newResults(Options{Modes: []string{ModeL7}})
	l7Only.carryOver(dir, false, false, true, log)
	if len(l7Only.Scale) != 1 || len(l7Only.Netpol) != 1 || l7Only.L7 != nil || l7Only.Machine != then || l7Only.Iptables != "iptables v1.8.11" {
		t.Errorf("l7-only run: %+v", l7Only)
	}
	np := newResults(Options{Modes: []string{ModeNetpol}})
	np.carryOver(dir, false, true, false, log)
	if np.L7 == nil || np.L7.Date != "then" || len(np.Netpol) != 0 || np.Machine == then || !strings.Contains(np.Markdown(), "## L7") {
		t.Errorf("netpol-only run lost the L7 table: %+v", np)
	}
}
