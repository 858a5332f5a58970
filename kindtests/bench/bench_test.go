//go:build linux

package bench

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"
)

// TestMain lets the test binary serve as the harness's child processes
// (backend server, client worker, socket-LB agent), as kebpf-bench does.
func TestMain(m *testing.M) {
	if Child() {
		return
	}
	os.Exit(m.Run())
}

// TestIntegrationBenchSmoke runs the whole harness at N=10 and checks every
// mode produced numbers and nothing of the run is left on the host.
func TestIntegrationBenchSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("integration: needs root, netns, cgroup v2, BPF and the kube binaries")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	kubeBin := "/root/.cache/kubectl-ebpf/k8s-v1.35.4/bin"
	if _, err := os.Stat(kubeBin + "/kube-proxy"); err != nil {
		t.Skipf("kube binaries not built (make cluster-up builds them): %v", err)
	}
	modes := []string{ModeDirect, ModeSocklb, ModeIptables}
	var id string
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := Run(ctx, Options{
		Scales: []int{10}, Modes: modes, BulkServices: 20, BulkEndpoints: 2, Changes: 3, LatCount: 200,
		ModeTimeout: time.Minute, KubeBinDir: kubeBin,
		Log:   slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		OnEnv: func(s string) { id = s },
	})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if id == "" {
		t.Fatal("no environment was created")
	}
	if left := Leftovers(id); len(left) > 0 {
		t.Errorf("left behind after the run:\n%v", left)
	}
	for _, m := range modes {
		p, ok := res.Point(m, 10)
		switch {
		case !ok:
			t.Errorf("%s: no measurement at N=10", m)
		case p.NA != "":
			t.Errorf("%s: n/a: %s", m, p.NA)
		case p.P50us <= 0 || p.P99us < p.P50us || p.ConnPerSec <= 0:
			t.Errorf("%s: implausible numbers %+v", m, p)
		}
		if m == ModeDirect {
			continue
		}
		b := res.Bulk[m]
		if b.NA != "" || b.Changes != 3 || b.ChangeP50ms <= 0 || b.AllAnsweringSeconds <= 0 {
			t.Errorf("%s: bulk/churn phase incomplete: %+v", m, b)
		}
	}
	if md := res.Markdown(); len(md) == 0 {
		t.Error("empty markdown")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}
