//go:build linux

package netpol

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// Steering entries as bpf/sockmap writes them (the maps are shared; see
// ../include/l7_shared.h), written directly for prog.Run tests.

func l7Dst(ap netip.AddrPort) NetpolL7Dst {
	fam, w := addrWords(ap.Addr())
	return NetpolL7Dst{Addr: w, Port: be16(ap.Port()), Family: uint16(fam)}
}

// setOrig records that Envoy's accepted socket {envoy, client} stands for
// client -> orig (what sockmap's sockops writes at the client's connect).
func setOrig(t testing.TB, o *Objects, envoy, client, orig netip.AddrPort) {
	t.Helper()
	fam, l := addrWords(envoy.Addr())
	_, r := addrWords(client.Addr())
	k := NetpolL7Tuple{Local: l, Remote: r, LocalPort: uint32(envoy.Port()), RemotePort: uint32(client.Port()), Family: uint32(fam)}
	if err := o.objs.KebpfL7Orig.Update(k, l7Dst(orig), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	setActive(t, o, true)
}

// setActive writes kebpf_l7_active (sockmap raises it with the first
// steered destination).
func setActive(t testing.TB, o *Objects, on bool) {
	t.Helper()
	v := uint32(0)
	if on {
		v = 1
	}
	if err := o.objs.KebpfL7Active.Update(uint32(0), v, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
}

func setSteered(t testing.TB, o *Objects, dst netip.AddrPort) {
	t.Helper()
	if err := o.objs.KebpfL7Dst.Update(l7Dst(dst), uint32(1), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	setActive(t, o, true)
}

func l7Counters(t testing.TB, o *Objects) L7Counters {
	t.Helper()
	c, err := o.L7Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// TestL7ClientSYN: a client's SYN steered to Envoy (a node address) is
// judged on the original pair: the client's egress and the destination
// endpoint's ingress, both as a direct SYN would be. The client is the
// prog.Run endpoint (ifindex 1); the destination another endpoint.
func TestL7ClientSYN(t *testing.T) {
	bpftest.RequireRoot(t)
	const (
		dstIP  = "10.125.0.50"
		dstIP6 = "fd00:125::50"
		envoy  = hostIP + ":15001"
		envoy6 = "[fd00:125::1]:15001"
	)
	dstPol := EndpointPolicy{ID: 7, IfIndex: 77, IPs: []netip.Addr{addr(dstIP), addr(dstIP6)}, DefaultDenyPolicy: 70}
	allowA := []PeerEntry{peer(podIP+"/32", rule(TCP, 80, 0, 71, 0)), peer(podIP6+"/128", rule(TCP, 80, 0, 71, 0))}
	egressTo := func(port uint16) []PeerEntry {
		return []PeerEntry{peer(dstIP+"/32", rule(TCP, port, 0, 41, 2)), peer(dstIP6+"/128", rule(TCP, port, 0, 41, 2))}
	}
	syn := func(src, dst string, sport, dport uint16) pkt { return tcpPkt(src, dst, sport, dport, tcpSYN) }
	// The client's SYN to Envoy, and the pair it stands for.
	steered := syn(podIP, hostIP, 40000, 15001)
	steered6 := syn(podIP6, "fd00:125::1", 40000, 15001)

	rows := []struct {
		name     string
		client   *EndpointPolicy
		dstIng   []PeerEntry // nil: destination ingress not enforced
		origPort uint16
		pkt      pkt
		want     int32
		wantC    L7Counters
	}{
		{"both allow", endpoint(false, true, nil, egressTo(80)), allowA, 80, steered, actPass, L7Counters{Allowed: 1}},
		{"both allow v6", endpoint(false, true, nil, egressTo(80)), allowA, 80, steered6, actPass, L7Counters{Allowed: 1}},
		{"client egress denies", endpoint(false, true, nil, egressTo(81)), allowA, 80, steered, actDrop, L7Counters{DeniedEgress: 1}},
		{"client egress denies v6", endpoint(false, true, nil, egressTo(81)), allowA, 80, steered6, actDrop, L7Counters{DeniedEgress: 1}},
		{"destination ingress denies", endpoint(false, true, nil, egressTo(81)), allowA, 81, steered, actDrop, L7Counters{DeniedIngress: 1}},
		{"destination denies, client unenforced", endpoint(false, false, nil, nil), allowA, 81, steered, actDrop, L7Counters{DeniedIngress: 1}},
		{"destination denies, client ingress-only", endpoint(true, false, nil, nil), allowA, 81, steered, actDrop, L7Counters{DeniedIngress: 1}},
		{"nothing enforced", endpoint(false, false, nil, nil), nil, 81, steered, actPass, L7Counters{Allowed: 1}},
		{"not steered: node address as ever", endpoint(false, true, nil, nil), nil, 80, syn(podIP, hostIP, 40001, 15001), actPass, L7Counters{}},
		{"SYN-ACK not judged", endpoint(false, true, nil, egressTo(81)), allowA, 80, tcpPkt(podIP, hostIP, 40000, 15001, tcpSYN|tcpACK), actPass, L7Counters{}},
	}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			o := loadMaps(t, "", LoadOptions{})
			from, _ := o.Programs()
			if err := o.SetHostIPs([]netip.Addr{addr(hostIP), addr("fd00:125::1")}); err != nil {
				t.Fatal(err)
			}
			mustApply(t, o, *r.client)
			dp := dstPol
			dp.IngressEnforced, dp.Ingress = r.dstIng != nil, r.dstIng
			mustApply(t, o, dp)
			setOrig(t, o, ap(envoy), ap(podIP+":40000"), netip.AddrPortFrom(addr(dstIP), r.origPort))
			setOrig(t, o, ap(envoy6), ap("["+podIP6+"]:40000"), netip.AddrPortFrom(addr(dstIP6), r.origPort))
			rd, err := ringbuf.NewReader(o.EventsMap())
			if err != nil {
				t.Fatal(err)
			}
			defer rd.Close()

			if got := run(t, from, r.pkt.frame()); got != r.want {
				t.Fatalf("%s: got %s, want %s", r.name, actName(got), actName(r.want))
			}
			if c := l7Counters(t, o); c != r.wantC {
				t.Errorf("L7 counters = %+v, want %+v", c, r.wantC)
			}
			if r.wantC == (L7Counters{}) {
				return
			}
			// Events and counters name the original pair, on the
			// endpoint whose policy decided.
			origDst := netip.AddrPortFrom(addr(dstIP), r.origPort)
			if r.pkt.src.Is6() {
				origDst = netip.AddrPortFrom(addr(dstIP6), r.origPort)
			}
			deniedBy := uint32(0)
			switch {
			case r.wantC.DeniedEgress > 0:
				deniedBy = 42
			case r.wantC.DeniedIngress > 0:
				deniedBy = 7
			}
			if !sawEvent(t, rd, func(e Event) bool {
				return e.Dst == origDst && e.Src.Addr() == r.pkt.src &&
					(deniedBy == 0 && e.Verdict == VerdictAllow || e.Endpoint == deniedBy && e.Verdict == VerdictDeny)
			}) {
				t.Errorf("no event for %s -> %s (denied by endpoint %d)", r.pkt.src, origDst, deniedBy)
			}
			if deniedBy != 0 {
				c, err := o.Counters(deniedBy)
				if err != nil {
					t.Fatal(err)
				}
				if c.Ingress.Denied+c.Egress.Denied != 1 {
					t.Errorf("endpoint %d counters = %+v, want one denied packet", deniedBy, c)
				}
			}
		})
	}
}

// TestL7SYNToPod: a SYN to a steered pod:port that did not come from an
// Envoy socket is dropped, enforced endpoint or not (prog.Run packets have
// no socket, like packets forwarded from another netns); other ports, and
// the rest of a handshake, are not affected.
func TestL7SYNToPod(t *testing.T) {
	bpftest.RequireRoot(t)
	for _, pol := range []*EndpointPolicy{endpoint(false, false, nil, nil), endpoint(true, true, []PeerEntry{peer("0.0.0.0/0", rule(AnyProto, 0, 0, 1, 0)), peer("::/0", rule(AnyProto, 0, 0, 1, 0))}, nil)} {
		o := loadMaps(t, "", LoadOptions{})
		_, to := o.Programs()
		mustApply(t, o, *pol)
		if err := o.SetHostIPs([]netip.Addr{addr(hostIP)}); err != nil {
			t.Fatal(err)
		}
		setSteered(t, o, ap(podIP+":80"))
		setSteered(t, o, ap("["+podIP6+"]:80"))
		rd, err := ringbuf.NewReader(o.EventsMap())
		if err != nil {
			t.Fatal(err)
		}
		defer rd.Close()
		for _, s := range []struct {
			name string
			p    pkt
			want int32
		}{
			{"SYN from a pod", tcpPkt(peerA, podIP, 1000, 80, tcpSYN), actDrop},
			{"SYN from the node address", tcpPkt(hostIP, podIP, 1001, 80, tcpSYN), actDrop},
			{"SYN v6", tcpPkt(peer6, podIP6, 1002, 80, tcpSYN), actDrop},
			{"other port", tcpPkt(peerA, podIP, 1003, 81, tcpSYN), actPass},
			{"ACK", tcpPkt(peerA, podIP, 1004, 80, tcpACK), actPass},
			{"SYN-ACK (the pod's own connect from port 80)", tcpPkt(peerA, podIP, 1005, 80, tcpSYN|tcpACK), actPass},
			{"UDP", udpPkt(peerA, podIP, 1006, 80), actPass},
		} {
			if got := run(t, to, s.p.frame()); got != s.want {
				t.Errorf("enforced=%v %s: got %s, want %s", pol.IngressEnforced, s.name, actName(got), actName(s.want))
			}
		}
		if c := l7Counters(t, o); c != (L7Counters{Bypass: 3}) {
			t.Errorf("enforced=%v: L7 counters = %+v, want Bypass 3", pol.IngressEnforced, c)
		}
		if !sawEvent(t, rd, func(e Event) bool {
			return e.Reason == ReasonL7Bypass && e.Verdict == VerdictDeny && e.Dir == Ingress && e.Endpoint == 42 &&
				e.Src == ap(hostIP+":1001") && e.Dst == ap(podIP+":80")
		}) {
			t.Errorf("enforced=%v: no L7 bypass event", pol.IngressEnforced)
		}
		c, err := o.Counters(42)
		if err != nil {
			t.Fatal(err)
		}
		if c.Ingress.Denied != 3 {
			t.Errorf("enforced=%v: counters %+v, want 3 ingress denied", pol.IngressEnforced, c)
		}
		// kebpf_l7_active is only the unenforced endpoints' gate: an
		// enforced endpoint keeps checking without it.
		setActive(t, o, false)
		want := actPass
		if pol.IngressEnforced {
			want = actDrop
		}
		if got := run(t, to, tcpPkt(peerA, podIP, 1010, 80, tcpSYN).frame()); got != want {
			t.Errorf("enforced=%v, steering inactive: got %s, want %s", pol.IngressEnforced, actName(got), actName(want))
		}
	}
}

// TestPodIPs: kebpf_np_ip follows the endpoints' addresses through apply,
// address and interface changes, delete and a restart.
func TestPodIPs(t *testing.T) {
	bpftest.RequireRoot(t)
	root := bpftest.BPFFS(t)
	o := loadMaps(t, root, LoadOptions{})
	want := func(o *Objects, w map[netip.Addr]int) {
		t.Helper()
		got, err := o.PodIPs()
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(w) {
			t.Fatalf("PodIPs = %v, want %v", got, w)
		}
		for a, i := range w {
			if got[a] != i {
				t.Fatalf("PodIPs = %v, want %v", got, w)
			}
		}
	}
	a := EndpointPolicy{ID: 1, IfIndex: 10, IPs: []netip.Addr{addr("10.0.0.1"), addr("fd00::1")}}
	b := EndpointPolicy{ID: 2, IfIndex: 20, IPs: []netip.Addr{addr("10.0.0.2")}}
	mustApply(t, o, a)
	mustApply(t, o, b)
	want(o, map[netip.Addr]int{addr("10.0.0.1"): 10, addr("fd00::1"): 10, addr("10.0.0.2"): 20})
	a.IPs = []netip.Addr{addr("10.0.0.1")}
	a.IfIndex = 11
	mustApply(t, o, a)
	want(o, map[netip.Addr]int{addr("10.0.0.1"): 11, addr("10.0.0.2"): 20})
	// b's address reused by a new endpoint before b is deleted: b's delete
	// leaves the new owner's entry alone.
	c := EndpointPolicy{ID: 3, IfIndex: 30, IPs: []netip.Addr{addr("10.0.0.2")}}
	mustApply(t, o, c)
	if err := o.DeleteEndpoint(2); err != nil {
		t.Fatal(err)
	}
	want(o, map[netip.Addr]int{addr("10.0.0.1"): 11, addr("10.0.0.2"): 30})

	// A stale entry (an agent that died mid-apply) is dropped at Load.
	if err := o.objs.KebpfNpIp.Update(addrKey(addr("10.0.0.9")), uint32(99), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	pinDir := o.pinDir
	o.Close()
	o2, err := Load(pinDir, LoadOptions{noAttach: true, MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 16384, MaxEndpoints: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o2.Close() })
	want(o2, map[netip.Addr]int{addr("10.0.0.1"): 11, addr("10.0.0.2"): 30})
}
