//go:build linux

package bench

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIntegrationBenchTraceSmoke runs the trace bench at two low rates:
// every event sent is delivered or announced lost, the rows carry numbers,
// the files are written, and the run leaves no trace-bench netns behind.
func TestIntegrationBenchTraceSmoke(t *testing.T) {
	requireRoot(t, "netns and BPF")
	requireTools(t, "ip")
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	before := netnsList(t)
	res, err := RunTrace(ctx, TraceOptions{Rates: []int{2000, 10000}, Duration: 500 * time.Millisecond, Out: out})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Rows) != 2 {
		t.Fatalf("rows %+v", res.Rows)
	}
	for _, r := range res.Rows {
		if r.Sent == 0 || r.Delivered+r.LostKern+r.LostSlow != r.Sent || r.CPU <= 0 || r.Achieved < 0.9*float64(r.Target) {
			t.Errorf("row %+v", r)
		}
	}
	md, err := os.ReadFile(filepath.Join(out, "bench-trace.md"))
	if err != nil || !strings.Contains(string(md), "| 10000 |") || !strings.Contains(string(md), "Goal (>= 100000") {
		t.Errorf("bench-trace.md: %v\n%s", err, md)
	}
	if after := netnsList(t); after != before {
		t.Errorf("netns left behind:\nbefore %s\nafter  %s", before, after)
	}
}

func netnsList(t *testing.T) string {
	t.Helper()
	ents, _ := os.ReadDir("/run/netns")
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), namePrefix) && strings.HasSuffix(e.Name(), "-tr") {
			names = append(names, e.Name())
		}
	}
	return strings.Join(names, ",")
}
