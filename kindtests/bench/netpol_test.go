//go:build linux

package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIntegrationBenchNetpolSmoke runs the NetworkPolicy bench at N=0 and
// N=10 with tiny samples in two rounds: every column must produce numbers
// in every round (and enforce: sample() records n/a when a denied port gets
// through or the client is refused), and teardown must leave no netns,
// mount, process, rule or set behind.
func TestIntegrationBenchNetpolSmoke(t *testing.T) {
	requireRoot(t, "netns, BPF, iptables and ipset")
	requireTools(t, "ip", "iptables-restore", "ipset", "nft", "conntrack")
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, id := runClean(t, ctx, Options{
		Modes: []string{ModeNetpol}, PolicyScales: []int{0, 10}, NetpolConns: 100, NetpolRR: 200 * time.Millisecond,
		NetpolFlows: 200 * time.Millisecond, NetpolRounds: 2,
		Out: out,
	})
	// Rules and sets lived only in the node netns: none may appear here.
	if b, err := exec.Command("nft", "list", "ruleset").CombinedOutput(); err == nil && strings.Contains(string(b), npChain) {
		t.Errorf("chain %s found in the host netns", npChain)
	}
	if b, err := exec.Command("ipset", "list", "-n").CombinedOutput(); err == nil && strings.Contains(string(b), "kebpf-np-"+id) {
		t.Errorf("ipset kebpf-np-%s found in the host netns", id)
	}
	for _, n := range []int{0, 10} {
		for _, dp := range NetpolDatapaths {
			p, ok := res.NetpolPoint(dp, n)
			if checkPoint(t, fmt.Sprintf("%s N=%d", dp, n), ok, p.NA, p.Rounds, len(p.Samples), 2) {
				switch {
				case p.ConnPerSec <= 0 || p.ConnP50us <= 0 || p.ConnP99us < p.ConnP50us || p.RRPerSec <= 0 || p.RRus <= 0 ||
					p.FlowsPerSec <= 0 || p.FlowUs <= 0:
					t.Errorf("%s N=%d: implausible numbers %+v", dp, n, p)
				case dp != NetpolNone && p.ProgramSeconds <= 0:
					t.Errorf("%s N=%d: no program time %+v", dp, n, p)
				}
			}
			checkRotation(t, dp+" at "+human(n)+" CIDRs", NetpolDatapaths, dp, p.Samples)
		}
	}
	md, err := os.ReadFile(filepath.Join(out, "bench.md"))
	if err != nil {
		t.Fatal(err)
	}
	checkMarkdown(t, string(md), []string{"no policy", "eBPF (ours)", "iptables linear", "ipset", "10 CIDRs", "UDP new flows/s", "rounds: 2 per scale"}, nil)
}
