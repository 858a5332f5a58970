//go:build linux

package bench

import (
	"context"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

// TestIntegrationBenchSmoke runs the whole harness at N=10 and checks every
// mode produced numbers and nothing of the run is left on the host.
func TestIntegrationBenchSmoke(t *testing.T) {
	requireRoot(t, "netns, cgroup v2, BPF and the kube binaries")
	requireTools(t, "ip", "nft", "conntrack", "etcd")
	// The Kubernetes binaries are ours to build (once, cached under
	// KEBPF_CACHE_DIR), so a missing one is built, never a reason to skip.
	kubeBin, err := k8sbin.Ensure(t.Context(), testWriter{t})
	if err != nil {
		t.Fatalf("kubernetes binaries: %v", err)
	}
	modes := []string{ModeDirect, ModeSocklb, ModeIptables}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, _ := runClean(t, ctx, Options{
		Scales: []int{10}, Modes: modes, Rounds: 2, BulkServices: 20, BulkEndpoints: 2, Changes: 3, LatCount: 200,
		ModeTimeout: time.Minute, KubeBinDir: kubeBin,
	})
	for _, m := range modes {
		p, ok := res.Point(m, 10)
		if checkPoint(t, m+" at N=10", ok, p.NA, p.Rounds, len(p.Samples), 2) {
			switch {
			case p.P50us <= 0 || p.P99us < p.P50us || p.ConnPerSec <= 0:
				t.Errorf("%s: implausible numbers %+v", m, p)
			case m != ModeDirect && p.ProgramSeconds <= 0:
				t.Errorf("%s: no program time %+v", m, p)
			}
		}
		checkRotation(t, m, modes, m, p.Samples)
		if m == ModeDirect {
			continue
		}
		b := res.Bulk[m]
		if b.NA != "" || b.Changes != 3 || b.ChangeP50ms <= 0 || b.AllAnsweringSeconds <= 0 {
			t.Errorf("%s: bulk/churn phase incomplete: %+v", m, b)
		}
	}
	checkMarkdown(t, res.Markdown(), []string{"- rounds: 2 per scale", "Kubernetes " + k8sbin.Version, "revision ", "iptables v"}, []string{"(not recorded)"})
}
