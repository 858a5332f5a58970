//go:build linux

package trace

import (
	"context"
	"net/netip"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/podindex"
)

// BenchmarkLBEventPublish is the agent's per-event work after the ring
// read: naming (real pod index, a cgroup id it does not know) and Publish
// to a hub with one following client draining it.
func BenchmarkLBEventPublish(b *testing.B) {
	h, err := NewHub(Options{Node: "n1", QueueSize: 1 << 16})
	if err != nil {
		b.Fatal(err)
	}
	sub := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for {
			if _, ok := sub.Next(ctx); !ok {
				return
			}
		}
	}()
	pods := podindex.New("n1", b.TempDir())
	names := svcNames{5: {"default/web", "http"}}
	ev := socklb.Event{At: time.Second, CgroupID: 12345, Cookie: 1, PID: 100, TID: 100, ServiceID: 5,
		Verdict: socklb.VerdictTranslated, Hook: socklb.HookConnect, Proto: socklb.TCP,
		Frontend: netip.MustParseAddrPort("10.96.0.10:80"), Backend: netip.MustParseAddrPort("10.244.1.5:8080"), Comm: "curl"}
	clk := newClock()
	b.ReportAllocs()
	for b.Loop() {
		h.Publish(LBEvent(ev, "n1", clk.wall(ev.At), names, pods, pods))
	}
}
