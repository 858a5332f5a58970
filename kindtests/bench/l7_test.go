//go:build linux

package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// TestIntegrationBenchL7Smoke runs the L7 bench with short samples in two
// rounds at 1 and 2 connections and three policy changes: every column must
// produce numbers in every round (sample() records n/a when a column's
// connections did not take its path), the changes and Envoy's RSS must be
// measured, and teardown must leave nothing behind. No timing is asserted.
func TestIntegrationBenchL7Smoke(t *testing.T) {
	requireRoot(t, "netns, cgroup v2, BPF, iptables and a real Envoy")
	requireTools(t, "ip", "iptables", "nft", "nsenter")
	envoytest.Require(t)
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	conns := []int{1, 2}
	res, _ := runClean(t, ctx, Options{
		Modes: []string{ModeL7}, L7Conns: conns, L7Duration: 200 * time.Millisecond, L7Rounds: 2, L7Changes: 3, Out: out,
	})
	l := res.L7
	if l == nil || l.NA != "" {
		t.Fatalf("no L7 results: %+v", l)
	}
	for _, c := range conns {
		for _, col := range L7Columns {
			what := fmt.Sprintf("%s at %d connections", col, c)
			p, ok := l.point(col, c)
			if checkPoint(t, what, ok, p.NA, p.Rounds, len(p.Samples), 2) && (p.P50us <= 0 || p.P99us < p.P50us || p.ReqPerSec <= 0 || p.Errors != 0) {
				t.Errorf("%s: implausible numbers %+v", what, p)
			}
			checkRotation(t, what, L7Columns, col, p.Samples)
		}
	}
	if ch := l.Changes; ch.NA != "" || ch.Changes != 3 || ch.AckP50ms <= 0 || ch.EnforceP50ms <= 0 {
		t.Errorf("policy changes incomplete: %+v", ch)
	}
	if l.RSSIdleKB <= 0 || l.RSSLoadKB <= 0 {
		t.Errorf("no Envoy RSS: idle %d kB, after load %d kB", l.RSSIdleKB, l.RSSLoadKB)
	}
	md, err := os.ReadFile(filepath.Join(out, "bench.md"))
	if err != nil {
		t.Fatal(err)
	}
	checkMarkdown(t, string(md), []string{"## L7: HTTP through the node-local Envoy", "(b) Envoy via bpf/sockmap", "request p50 / p99 µs, 2 connections",
		"added over (a)", "Goal (issue 9)", "L7Policy change to new verdict", "Envoy RSS idle", "rounds: 2 per number of connections", "/" + envoytest.Version + "/"},
		[]string{"(not recorded)", "n/a ("})
}
