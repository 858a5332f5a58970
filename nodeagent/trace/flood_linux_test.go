//go:build linux

package trace

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
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

// tcActShot is TC_ACT_SHOT, the policy program's drop.
const tcActShot = 2

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
	// The reader takes its loss baseline, then waits for ready: the ring
	// overruns on purpose while the flood runs.
	ready := make(chan struct{})
	r := &PolicyReader{Events: objs.EventsMap(), Lost: objs.EventsLost, LostEvery: 10 * time.Millisecond, Hub: h,
		Node: "n1", Namer: fakeNamer{}, Log: slog.Default(), Ready: ready}
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
				ret, err := to.Run(&ebpf.RunOptions{Data: synFrame(src, pod, uint16(i), 80)})
				if err != nil {
					return err
				}
				// The verdict does not depend on the ring having room.
				if ret != tcActShot {
					return fmt.Errorf("flow %d: program returned %d, want TC_ACT_SHOT (denied)", i, ret)
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer wcancel()
	// The baseline is taken before the reader waits; give it a moment so
	// the flood's losses all count above it.
	time.Sleep(100 * time.Millisecond)

	const flows = 50000
	start := time.Now()
	runFlows(1, flows)
	sent := time.Since(start)
	close(ready)
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
	if delivered+announced != flows || announced != kernel || announced == 0 {
		t.Errorf("delivered %d + announced %d, want %d with some lost (the ring overran); the datapath counted %d lost", delivered, announced, flows, kernel)
	}
	// The reader is healthy after the overrun: the next flow's event comes.
	runFlows(flows+1, flows+1)
	for {
		l, ok := sub.Next(wctx)
		if !ok {
			t.Fatal("no event after the overrun")
		}
		if l.Event != nil {
			break
		}
	}
	t.Logf("%d new flows through prog.Run in %v (%.0f/s): %d events delivered, %d lost in the kernel and announced",
		flows, sent.Round(time.Millisecond), flows/sent.Seconds(), delivered, announced)
}

// Events the kernel lost while no agent read (between two agents) are
// reported by the next agent: the last count read is kept in LostFile.
func TestLostBetweenAgents(t *testing.T) {
	bpftest.RequireRoot(t)
	n := bpftest.Netns(t, "kebpf-trlb-")
	inN := func(fn func() error) error { return netnsutil.Do(netnsutil.Path(n), fn) }
	pod := netip.MustParseAddr("10.127.0.2")
	pinDir := bpftest.PinDir(t)
	t.Cleanup(func() { inN(func() error { return dp.DetachPinned(pinDir) }) })
	var objs *dp.Objects
	if err := inN(func() error {
		var err error
		// One page of ring: a few dozen events fit.
		objs, err = dp.Load(pinDir, dp.LoadOptions{MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 1024, MaxEndpoints: 16, EventsBytes: 4096})
		if err != nil {
			return err
		}
		return objs.ApplyEndpoint(dp.EndpointPolicy{ID: 2, IfIndex: 1, IPs: []netip.Addr{pod}, IngressEnforced: true, DefaultDenyPolicy: 7})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	_, to := objs.Programs()
	flows := func(first, last int) {
		if err := inN(func() error {
			for i := first; i <= last; i++ {
				if _, err := to.Run(&ebpf.RunOptions{Data: synFrame(netip.AddrFrom4([4]byte{10, 128, byte(i >> 8), byte(i)}), pod, uint16(i), 80)}); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	lostFile := filepath.Join(t.TempDir(), "policy-events-lost.json")
	agent := func(t *testing.T) (*Hub, func()) {
		h, err := NewHub(Options{Node: "n1"})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		r := &PolicyReader{Events: objs.EventsMap(), Lost: objs.EventsLost, LostEvery: 10 * time.Millisecond, Hub: h,
			Node: "n1", Namer: fakeNamer{}, Log: slog.Default(), LostFile: lostFile}
		go func() { done <- r.Run(ctx) }()
		return h, func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("reader: %v", err)
			}
		}
	}
	waitStats := func(h *Hub, what string, ok func(Stats) bool) Stats {
		deadline := time.Now().Add(5 * time.Second)
		for {
			st := h.Stats()
			if ok(st) {
				return st
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: stats %+v", what, st)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// Agent 1 reads one event, then loses some itself (counted), then stops.
	h1, stop1 := agent(t)
	flows(1, 1)
	waitStats(h1, "first event", func(s Stats) bool { return s.Published[apiv1.TraceTypePolicy] == 1 })
	stop1()

	// No agent: the ring fills and the kernel counts the rest.
	before, err := objs.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	flows(2, 400)
	after, err := objs.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	if after <= before {
		t.Fatalf("the kernel lost nothing (%d -> %d): the test needs a full ring", before, after)
	}

	// Agent 2 reports exactly those.
	h2, stop2 := agent(t)
	defer stop2()
	st := waitStats(h2, "losses between agents", func(s Stats) bool { return s.Lost[apiv1.TraceLostKernel] > 0 })
	time.Sleep(50 * time.Millisecond) // a further poll must add nothing
	if st = h2.Stats(); st.Lost[apiv1.TraceLostKernel] != after-before {
		t.Errorf("agent 2 reported %d kernel losses, the kernel lost %d while no agent read", st.Lost[apiv1.TraceLostKernel], after-before)
	}
	t.Logf("lost between agents: %d (reported by the next agent)", after-before)

	// A file about another map (a recreated datapath) is ignored.
	if err := os.WriteFile(lostFile, []byte(`{"mapID":1,"lost":0}`), 0o600); err != nil {
		t.Fatal(err)
	}
	h3, stop3 := agent(t)
	defer stop3()
	time.Sleep(100 * time.Millisecond)
	if n := h3.Stats().Lost[apiv1.TraceLostKernel]; n != 0 {
		t.Errorf("a state file of another map made the agent report %d losses", n)
	}
}
