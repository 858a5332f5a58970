//go:build linux

package trace

import (
	"context"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// synFrame is an Ethernet + IPv4 + TCP SYN frame (checksums left zero: the
// policy programs do not check them).
func synFrame(src, dst netip.Addr, sport, dport uint16) []byte {
	b := make([]byte, 14+20+20)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(ip[2:], 40)
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12], tcp[13] = 0x50, 0x02
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	return b
}

// TestFloodAccounting floods the real policy program with new denied flows
// faster than a small ring buffer holds them: every event is either
// delivered to the stream or announced in it as lost, and the notices add
// up to the datapath's own count. It logs the rate reached (the trace
// benchmark's first row).
func TestFloodAccounting(t *testing.T) {
	bpftest.RequireRoot(t)
	// BPF_PROG_TEST_RUN hands the program an skb on the caller's
	// loopback: the endpoint is lo (ifindex 1) of a private netns, and the
	// program runs there.
	n := bpftest.Netns(t, "kebpf-trfl-")
	inN := func(fn func() error) error { return netnsutil.Do(netnsutil.Path(n), fn) }
	pod := netip.MustParseAddr("10.127.0.2")
	pinDir := bpftest.PinDir(t)
	t.Cleanup(func() { inN(func() error { return dp.DetachPinned(pinDir) }) })
	var objs *dp.Objects
	if err := inN(func() error {
		var err error
		objs, err = dp.Load(pinDir, dp.LoadOptions{MaxCT: 4096, MaxVerdicts: 65536, MaxPolicyEntries: 1024, MaxEndpoints: 16,
			EventsBytes: 1 << 16})
		if err != nil {
			return err
		}
		return objs.ApplyEndpoint(dp.EndpointPolicy{ID: 2, IfIndex: 1, IPs: []netip.Addr{pod},
			IngressEnforced: true, DefaultDenyPolicy: 7})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	_, to := objs.Programs()

	h, err := NewHub(Options{Node: "n1", QueueSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	sub := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	r := &PolicyReader{Events: objs.EventsMap(), Lost: objs.EventsLost, LostEvery: 10 * time.Millisecond, Hub: h,
		Node: "n1", Namer: fakeNamer{}, Log: slog.Default()}
	go func() { done <- r.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reader: %v", err)
		}
	}()

	runFlows := func(first, last int) {
		if err := inN(func() error {
			for i := first; i <= last; i++ {
				src := netip.AddrFrom4([4]byte{10, 128, byte(i >> 16), byte(i >> 8)})
				if _, err := to.Run(&ebpf.RunOptions{Data: synFrame(src, pod, uint16(i), 80)}); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	// One flow first: once its event is out, the reader has its loss
	// baseline.
	runFlows(0, 0)
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	if l, ok := sub.Next(wctx); !ok || l.Event == nil {
		t.Fatalf("first event: %+v %v", l, ok)
	}

	const flows = 50000
	start := time.Now()
	runFlows(1, flows)
	sent := time.Since(start)
	var delivered, announced uint64
	for delivered+announced < flows {
		l, ok := sub.Next(wctx)
		if !ok {
			t.Fatalf("after %d delivered + %d announced of %d: stream ended or 10s passed", delivered, announced, flows)
		}
		switch {
		case l.Event != nil:
			if l.Event.Verdict != apiv1.TraceVerdictDenied {
				t.Fatalf("event %+v", l.Event)
			}
			delivered++
		case l.Lost.Reason == apiv1.TraceLostKernel:
			announced += l.Lost.Count
		default:
			t.Fatalf("unexpected notice %+v", l.Lost)
		}
	}
	kernel, err := objs.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	if delivered+announced != flows || announced != kernel {
		t.Errorf("delivered %d + announced %d, want %d; the datapath counted %d lost", delivered, announced, flows, kernel)
	}
	t.Logf("%d new flows through prog.Run in %v (%.0f/s): %d events delivered, %d lost in the kernel and announced",
		flows, sent.Round(time.Millisecond), flows/sent.Seconds(), delivered, announced)
}
