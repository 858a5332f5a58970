//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

const (
	allowWait = 2 * time.Second
	// denyWait bounds a connection attempt expected to fail: the SYN is
	// dropped, so only a timeout can tell.
	denyWait = 300 * time.Millisecond
)

// sawEvent drains rd and reports whether an event matched.
func sawEvent(t *testing.T, rd *ringbuf.Reader, match func(Event) bool) bool {
	t.Helper()
	found := false
	rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
	for {
		rec, err := rd.Read()
		if err != nil {
			return found
		}
		if e, err := ParseEvent(rec.RawSample); err == nil && match(e) {
			found = true
		}
	}
}

// loadIn loads the datapath with attachment inside the node netns.
func loadIn(t *testing.T, tp *topo, pinDir string, mode AttachMode) *Objects {
	t.Helper()
	var o *Objects
	if err := inNetns(tp.n, func() error {
		var err error
		o, err = Load(pinDir, LoadOptions{MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 1024, MaxEndpoints: 16, Attach: mode})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if o.AttachMode() != mode {
		t.Fatalf("AttachMode() = %v, want %v", o.AttachMode(), mode)
	}
	return o
}

func applyIn(t *testing.T, tp *topo, o *Objects, p EndpointPolicy) time.Duration {
	t.Helper()
	var took time.Duration
	if err := inNetns(tp.n, func() error {
		start := time.Now()
		err := o.ApplyEndpoint(p)
		took = time.Since(start)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return took
}

// Real TCP/UDP between two pod netns through a routing node netns, with the
// programs attached by ApplyEndpoint to the host-side veths: the same table
// with tcx links and with clsact filters.
func TestIntegrationRealPackets(t *testing.T) {
	bpftest.RequireRoot(t)
	for _, mode := range []AttachMode{AttachTCX, AttachClsact} {
		t.Run(mode.String(), func(t *testing.T) { testRealPackets(t, mode) })
	}
}

func testRealPackets(t *testing.T, mode AttachMode) {
	tp := newTopo(t)
	serve(t, tp.b)
	serve(t, tp.a)
	pinDir := nodePinDir(t, tp)

	b80, b81, b53 := hostPort(ipB, 80), hostPort(ipB, 81), hostPort(ipB, 53)
	b6 := hostPort(ip6B, 80)
	if _, err := dialTCP(t, tp.a, b80, allowWait); err != nil {
		t.Fatalf("topology broken before any policy: tcp: %v", err)
	}
	if !probeUDP(t, tp.a, b53, allowWait) {
		t.Fatal("topology broken before any policy: udp")
	}
	if _, err := dialTCP(t, tp.a, b6, allowWait); err != nil {
		t.Fatalf("topology broken before any policy: tcp6: %v", err)
	}

	o := loadIn(t, tp, pinDir, mode)
	t.Cleanup(func() { o.Close() })
	rd, err := ringbuf.NewReader(o.EventsMap())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	if err := o.SetHostIPs([]netip.Addr{addr(ipNA), addr(ipNB), addr("fd00:125::a:1"), addr("fd00:125::b:1")}); err != nil {
		t.Fatal(err)
	}

	// b: ingress only from a, TCP 80 (v4 and v6). a: egress enforced,
	// allowed to b on TCP 80/81 and UDP 53; ingress default-deny.
	bPol := EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB), addr(ip6B)}, IngressEnforced: true, DefaultDenyPolicy: 20,
		Ingress: []PeerEntry{
			peer(ipA+"/32", rule(TCP, 80, 0, 21, 0)),
			peer(ip6A+"/128", rule(TCP, 80, 0, 21, 0)),
		}}
	aPol := EndpointPolicy{ID: 1, IfIndex: tp.ifA, IPs: []netip.Addr{addr(ipA), addr(ip6A)}, IngressEnforced: true, EgressEnforced: true, DefaultDenyPolicy: 10,
		Egress: []PeerEntry{
			peer(ipB+"/32", rule(TCP, 80, 81, 11, 0), rule(UDP, 53, 0, 11, 1)),
			peer(ip6B+"/128", rule(TCP, 80, 0, 11, 0)),
		}}
	applyIn(t, tp, o, bPol)
	applyIn(t, tp, o, aPol)
	attached(t, tp, mode, 4)
	if mode == AttachClsact {
		// Cross-check with tc: direct-action cls_bpf named after the program.
		for dev, dir := range map[string]string{"va": "ingress", "vb": "egress"} {
			out := sh(t, "tc", "-n", tp.n, "filter", "show", "dev", dev, dir)
			want := map[string]string{"ingress": FromProgramName, "egress": ToProgramName}[dir]
			if !strings.Contains(out, want) || !strings.Contains(out, "direct-action") || !strings.Contains(out, "pref 1 ") {
				t.Errorf("tc filter show dev %s %s: want %s direct-action at pref 1:\n%s", dev, dir, want, out)
			}
		}
		if out := bpftoolIn(t, tp.n, "net", "show"); !strings.Contains(out, FromProgramName) || !strings.Contains(out, ToProgramName) {
			t.Errorf("bpftool net show lacks our filters:\n%s", out)
		}
	}

	table := []struct {
		name   string
		from   string
		dst    string
		udp    bool
		wantOK bool
	}{
		{"a->b tcp 80 allowed both sides", tp.a, b80, false, true},
		{"a->b tcp 81 denied by b ingress", tp.a, b81, false, false},
		{"a->b udp 53 denied by b ingress", tp.a, b53, true, false},
		{"a->b v6 tcp 80", tp.a, b6, false, true},
		{"b->a tcp 80 denied by a ingress", tp.b, hostPort(ipA, 80), false, false},
		{"node->b tcp 81 (probe) allowed", tp.n, b81, false, true},
		{"node->a tcp 80 (probe) allowed", tp.n, hostPort(ipA, 80), false, true},
	}
	check := func(t *testing.T) {
		t.Helper()
		for _, r := range table {
			wait := allowWait
			if !r.wantOK {
				wait = denyWait
			}
			var got bool
			if r.udp {
				got = probeUDP(t, r.from, r.dst, wait)
			} else {
				got = probeTCP(t, r.from, r.dst, wait)
			}
			if got != r.wantOK {
				t.Errorf("%s: connected=%v, want %v", r.name, got, r.wantOK)
			}
		}
	}
	check(t)

	// Policy change, allow: b now accepts UDP 53 from a. Every probe is a
	// new flow (new socket, new source port).
	bPol.Ingress[0].Rules = append(bPol.Ingress[0].Rules, rule(UDP, 53, 0, 22, 0))
	took := applyIn(t, tp, o, bPol)
	start := time.Now()
	if !probeUDP(t, tp.a, b53, allowWait) {
		t.Fatal("udp 53 still denied after the allow")
	}
	t.Logf("policy change (allow): ApplyEndpoint took %v; first new flow answered %v after it returned", took, time.Since(start))
	table[2].wantOK = true

	// Established flow behaviour: a long-lived connection a->b:80, and one
	// to 81 opened by the node (host IP, never subject to policy).
	est, err := dialTCP(t, tp.a, b80, allowWait)
	if err != nil {
		t.Fatal(err)
	}
	defer est.Close()
	c0, err := o.Counters(2)
	if err != nil {
		t.Fatal(err)
	}
	before := c0.Ingress.Denied

	// Policy change, deny: b no longer accepts TCP 80.
	bPol.Ingress[0].Rules = []PortRule{rule(UDP, 53, 0, 22, 0)}
	bPol.Ingress[1].Rules = nil
	took = applyIn(t, tp, o, bPol)
	start = time.Now()
	probed := make(chan bool, 1)
	go func() { probed <- probeTCP(t, tp.a, b80, denyWait) }()
	for {
		c, err := o.Counters(2)
		if err != nil {
			t.Fatal(err)
		}
		if c.Ingress.Denied > before {
			break
		}
		if time.Since(start) > time.Second {
			t.Fatal("no deny counted")
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("policy change (deny): ApplyEndpoint took %v; first new flow's SYN dropped (counted) %v after it returned", took, time.Since(start))
	if <-probed {
		t.Error("new tcp 80 flow still allowed after the deny")
	}
	table[0].wantOK = false
	table[3].wantOK = false
	check(t)

	// The established connection is cut: its next packet is re-judged
	// against the new policy (see netpol.c), so the echo never comes back.
	if err := echo(est, denyWait); err == nil {
		t.Error("established tcp 80 flow still exchanges data after a policy denied it")
	}
	if !sawEvent(t, rd, func(e Event) bool { return e.Reason == ReasonRevoked && e.Endpoint == 2 && e.Verdict == VerdictDeny }) {
		t.Error("no revoked event for the cut flow")
	}

	// Restart: a new agent loads on the same pins and swaps its programs
	// into the pinned links; nothing is attached twice, state reads back.
	want, err := o.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	progsBefore := attached(t, tp, mode, 4)
	rd.Close()
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	attached(t, tp, mode, 4) // pinned links / unpinned filters stay
	check(t)                 // still enforced with no agent running
	o2 := loadIn(t, tp, pinDir, mode)
	t.Cleanup(func() { o2.Close() })
	got, err := o2.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[1].IfIndex != want[1].IfIndex || len(got[2].Ingress) != len(want[2].Ingress) {
		t.Errorf("endpoints after restart = %+v, want %+v", got, want)
	}
	// Updated, not duplicated.
	progsAfter := attached(t, tp, mode, 4)
	for i := range progsAfter {
		if i < len(progsBefore) && progsAfter[i] == progsBefore[i] {
			t.Errorf("attachment still runs the old program: %s", progsAfter[i])
		}
	}
	applyIn(t, tp, o2, aPol) // idempotent re-apply
	attached(t, tp, mode, 4)
	check(t)

	// DeleteEndpoint detaches that pod only.
	if err := inNetns(tp.n, func() error { return o2.DeleteEndpoint(2) }); err != nil {
		t.Fatal(err)
	}
	if got := attached(t, tp, mode, 2); len(got) == 2 && (!strings.HasPrefix(got[0], fmt.Sprint(tp.ifA)+"/") || !strings.HasPrefix(got[1], fmt.Sprint(tp.ifA)+"/")) {
		t.Errorf("after delete: %v, want a's 2 attachments", got)
	}
	if !probeTCP(t, tp.a, b80, allowWait) {
		t.Error("b unenforced after delete, but a->b:80 fails")
	}

	// Detach: nothing of ours remains (this is `disable policy`).
	if err := inNetns(tp.n, o2.Detach); err != nil {
		t.Fatal(err)
	}
	attached(t, tp, mode, 0)
	if out := bpftoolIn(t, tp.n, "net", "show"); strings.Contains(out, "kebpf_") {
		t.Errorf("bpftool net show after Detach:\n%s", out)
	}
	if out := sh(t, "bpftool", "link", "show"); strings.Contains(out, "kebpf_np") {
		t.Errorf("bpftool link show after Detach:\n%s", out)
	}
	for _, dir := range []string{MapPinDir(pinDir), filepath.Join(pinDir, "links")} {
		ents, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range ents {
			// The L7 maps shared with bpf/sockmap stay pinned (pins.go).
			if dir == MapPinDir(pinDir) && pins.IsSharedL7Map(e.Name()) {
				continue
			}
			t.Errorf("pin left after Detach: %s/%s", dir, e.Name())
		}
	}
	if !probeTCP(t, tp.b, hostPort(ipA, 80), allowWait) {
		t.Error("b->a still blocked after Detach")
	}
}
