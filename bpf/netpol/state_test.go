//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// An established flow that a policy change denies is cut on its next packet
// (both directions); flows the new policy still allows keep passing.
func TestPolicyChangeRevokesEstablishedFlows(t *testing.T) {
	bpftest.RequireRoot(t)
	o := loadMaps(t, "", LoadOptions{})
	from, to := o.Programs()
	both := endpoint(true, true, []PeerEntry{peer("10.125.0.0/24", rule(TCP, 80, 0, 1, 0), rule(TCP, 81, 0, 1, 1))}, nil)
	mustApply(t, o, *both)

	f80 := tcpPkt(peerA, podIP, 40000, 80, tcpSYN)
	f81 := tcpPkt(peerA, podIP, 40001, 81, tcpSYN)
	for _, f := range []pkt{f80, f81} {
		if got := run(t, to, f.frame()); got != actPass {
			t.Fatalf("syn %d: %s", f.dport, actName(got))
		}
		if got := run(t, from, f.reply(tcpSYN|tcpACK).frame()); got != actPass {
			t.Fatalf("syn-ack %d: %s", f.dport, actName(got))
		}
	}

	// Port 80 no longer allowed; 81 still is (now by policy 2).
	mustApply(t, o, *endpoint(true, true, []PeerEntry{peer("10.125.0.0/24", rule(TCP, 81, 0, 2, 0))}, nil))
	steps := []struct {
		name string
		from bool
		p    pkt
		want int32
	}{
		{"reply of revoked flow", true, f80.reply(tcpACK), actDrop},
		{"forward of revoked flow", false, tcpPkt(peerA, podIP, 40000, 80, tcpACK), actDrop},
		{"still allowed flow, reply first", true, f81.reply(tcpACK), actPass},
		{"still allowed flow, forward", false, tcpPkt(peerA, podIP, 40001, 81, tcpACK), actPass},
	}
	for i, s := range steps {
		prog := to
		if s.from {
			prog = from
		}
		if got := run(t, prog, s.p.frame()); got != s.want {
			t.Errorf("%s: %s, want %s", s.name, actName(got), actName(s.want))
		}
		if i == 0 {
			checkRevoked(t, o)
		}
	}
	flows, err := o.Flows()
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != 1 || flows[0].Dst.Port() != 81 || flows[0].PolicyID != 2 || flows[0].Dir != Ingress {
		t.Errorf("flows after change = %+v, want only the port-81 flow, re-attributed to policy 2", flows)
	}
}

func checkRevoked(t *testing.T, o *Objects) {
	t.Helper()
	vs, err := o.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.Reason == ReasonRevoked && v.Verdict == VerdictDeny && v.PolicyID == 99 {
			return
		}
	}
	t.Errorf("no revoked verdict recorded: %+v", vs)
}

// Counters, the last-verdict map and the event ring buffer name the policy
// and rule that decided.
func TestAttribution(t *testing.T) {
	bpftest.RequireRoot(t)
	o := loadMaps(t, "", LoadOptions{})
	from, to := o.Programs()
	mustApply(t, o, *endpoint(true, false, []PeerEntry{peer("10.125.0.0/24", rule(UDP, 53, 0, 11, 3), rule(TCP, 80, 0, 12, 5))}, nil))
	rd, err := ringbuf.NewReader(o.EventsMap())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	allow := tcpPkt(peerA, podIP, 1234, 80, tcpSYN)
	run(t, to, allow.frame())                        // new flow, allowed by 12/5
	run(t, from, allow.reply(tcpSYN|tcpACK).frame()) // reply, egress not enforced: CT hit
	run(t, to, tcpPkt(peerA, podIP, 1234, 80, tcpACK).frame())
	deny := tcpPkt(peerB, podIP, 999, 22, tcpSYN)
	for range 5 {
		run(t, to, deny.frame()) // one event: rate-limited per flow
	}

	c, err := o.Counters(42)
	if err != nil {
		t.Fatal(err)
	}
	want := Counters{Ingress: DirCounters{Allowed: 2, Denied: 5, Flows: 1}, Egress: DirCounters{Allowed: 1}}
	if c != want {
		t.Errorf("counters = %+v, want %+v", c, want)
	}

	var evs []Event
	rd.SetDeadline(time.Now().Add(200 * time.Millisecond))
	for {
		rec, err := rd.Read()
		if err != nil {
			break
		}
		ev, err := ParseEvent(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, ev)
	}
	wantEv := []Event{
		{Endpoint: 42, PolicyID: 12, Rule: 5, Verdict: VerdictAllow, Reason: ReasonPolicy, Dir: Ingress, Proto: TCP,
			Src: netip.MustParseAddrPort(peerA + ":1234"), Dst: netip.MustParseAddrPort(podIP + ":80")},
		{Endpoint: 42, PolicyID: 99, Rule: RuleNone, Verdict: VerdictDeny, Reason: ReasonDefaultDeny, Dir: Ingress, Proto: TCP,
			Src: netip.MustParseAddrPort(peerB + ":999"), Dst: netip.MustParseAddrPort(podIP + ":22")},
	}
	for i := range evs {
		evs[i].At = 0
	}
	if !reflect.DeepEqual(evs, wantEv) {
		t.Errorf("events:\n got %+v\nwant %+v", evs, wantEv)
	}

	vs, err := o.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint16]Verdict{}
	for _, v := range vs {
		got[v.Dst.Port()] = v
		got[v.Src.Port()] = v
	}
	if v := got[80]; v.PolicyID != 12 || v.Rule != 5 || v.Verdict != VerdictAllow {
		t.Errorf("verdict of the allowed flow = %+v", v)
	}
	if v := got[22]; v.PolicyID != 99 || v.Rule != RuleNone || v.Verdict != VerdictDeny {
		t.Errorf("verdict of the denied flow = %+v", v)
	}
}

// Packets judged while the policy is swapped see the old or the new policy,
// never a mix: both policies deny X (an except /32 inside an allowed /24) and
// allow Y; a mixed view would pass X (the /32 gone, the /24 still there) or
// drop Y (nothing found).
func TestGenerationSwapAtomic(t *testing.T) {
	bpftest.RequireRoot(t)
	o := loadMaps(t, "", LoadOptions{MaxCT: 1 << 16})
	_, to := o.Programs()
	policy := func(id uint32) EndpointPolicy {
		peers := []PeerEntry{
			peer("10.125.0.0/24", rule(TCP, 80, 0, id, 0)),
			peer("10.125.0.200/32"),
		}
		for i := range 200 {
			peers = append(peers, peer(fmt.Sprintf("10.125.%d.%d/32", 1+i/250, i%250), rule(UDP, 1, 0, id, 1)))
		}
		return *endpoint(true, false, peers, nil)
	}
	mustApply(t, o, policy(1))

	var stop atomic.Bool
	var bad atomic.Int64
	var runs atomic.Int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				// A new source port each time: every packet is a new flow.
				sport := uint16(1024 + (w*16000+i)%60000)
				x := tcpPkt(peerB, podIP, sport, 80, tcpSYN).frame()
				y := tcpPkt(peerA, podIP, sport, 80, tcpSYN).frame()
				rx, err1 := to.Run(&ebpf.RunOptions{Data: x})
				ry, err2 := to.Run(&ebpf.RunOptions{Data: y})
				if err1 != nil || err2 != nil || int32(rx) != actDrop || int32(ry) != actPass {
					bad.Add(1)
				}
				runs.Add(2)
			}
		}()
	}
	applies := 0
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		applies++
		if err := o.ApplyEndpoint(policy(uint32(1 + applies%2))); err != nil {
			stop.Store(true)
			wg.Wait()
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d applies, %d packets judged concurrently", applies, runs.Load())
	if n := bad.Load(); n != 0 {
		t.Errorf("%d packet pairs saw a mixed policy", n)
	}
}

// A full policy map refuses an apply up front and keeps what was there.
func TestCapacity(t *testing.T) {
	bpftest.RequireRoot(t)
	o := loadMaps(t, "", LoadOptions{MaxPolicyEntries: 8, MaxEndpoints: 2})
	_, to := o.Programs()
	five := func(id uint32, ifindex int, port uint16) EndpointPolicy {
		p := EndpointPolicy{ID: id, IfIndex: ifindex, IngressEnforced: true}
		for i := range 5 {
			p.Ingress = append(p.Ingress, peer(fmt.Sprintf("10.125.0.%d/32", 10+i), rule(TCP, port, 0, 1, 0)))
		}
		return p
	}
	first := five(42, testIfindex, 80)
	mustApply(t, o, first)
	before, err := o.Endpoints()
	if err != nil {
		t.Fatal(err)
	}

	err = o.ApplyEndpoint(five(43, 7, 80))
	if !errors.Is(err, ErrFull) {
		t.Fatalf("second endpoint: %v, want ErrFull", err)
	}
	// Replacing in place needs old + new at once: 5 + 5 > 8.
	err = o.ApplyEndpoint(five(42, testIfindex, 81))
	if !errors.Is(err, ErrFull) {
		t.Fatalf("replace: %v, want ErrFull", err)
	}
	after, err := o.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(before, after) {
		t.Errorf("state changed by refused applies:\n before %+v\n after %+v", before, after)
	}
	if got := run(t, to, tcpPkt(peerA, podIP, 1, 80, tcpSYN).frame()); got != actPass {
		t.Errorf("old policy no longer in force: %s", actName(got))
	}
	if got := run(t, to, tcpPkt(peerA, podIP, 1, 81, tcpSYN).frame()); got != actDrop {
		t.Errorf("refused policy partly in force: %s", actName(got))
	}

	// Small enough to fit next to the old generation.
	small := EndpointPolicy{ID: 42, IfIndex: testIfindex, IngressEnforced: true, Ingress: []PeerEntry{peer("10.125.0.0/24", rule(TCP, 81, 0, 1, 0))}}
	mustApply(t, o, small)
	mustApply(t, o, EndpointPolicy{ID: 43, IfIndex: 7})
	if err := o.ApplyEndpoint(EndpointPolicy{ID: 44, IfIndex: 8}); !errors.Is(err, ErrFull) {
		t.Errorf("third endpoint with MaxEndpoints 2: %v, want ErrFull", err)
	}
	tooMany := EndpointPolicy{ID: 42, IfIndex: testIfindex, Ingress: []PeerEntry{{Prefix: pfx("10.0.0.0/8"), Rules: make([]PortRule, MaxRulesPerPrefix+1)}}}
	if err := o.ApplyEndpoint(tooMany); err == nil || errors.Is(err, ErrFull) {
		t.Errorf("17 rules on one prefix: %v, want a validation error", err)
	}
}

// After a restart (Load on the same pins) the endpoints read back exactly
// as applied, flows survive, and stale entries of an interrupted apply are
// collected.
func TestRestartReadsBack(t *testing.T) {
	bpftest.RequireRoot(t)
	root := bpftest.BPFFS(t)
	pinDir := root + "/kubectl-ebpf"
	opts := LoadOptions{MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 1024, MaxEndpoints: 16, noAttach: true}
	o, err := Load(pinDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	p := *endpoint(true, true, []PeerEntry{
		peer("10.125.0.0/24", rule(TCP, 80, 90, 1, 0), rule(SCTP, 0, 0, 2, 1)),
		peer("10.125.0.128/25"),
		peer("fd00:125::/64", rule(AnyProto, 0, 0, 3, 0)),
	}, []PeerEntry{peer("0.0.0.0/0", rule(UDP, 53, 0, 4, 2))})
	mustApply(t, o, p)
	mustApply(t, o, EndpointPolicy{ID: 7, IfIndex: 9, IPs: []netip.Addr{addr("10.125.0.9")}})
	if err := o.SetHostIPs([]netip.Addr{addr(hostIP)}); err != nil {
		t.Fatal(err)
	}
	_, to := o.Programs()
	if got := run(t, to, tcpPkt(peerA, podIP, 5, 85, tcpSYN).frame()); got != actPass {
		t.Fatalf("before restart: %s", actName(got))
	}
	want, err := o.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	// Simulate an apply that died after writing part of the next generation.
	k, v := polEntry(42, Ingress, 1, peer("10.99.0.0/16", rule(TCP, 1, 0, 1, 0)))
	if err := o.objs.KebpfNpPol.Put(k, v); err != nil {
		t.Fatal(err)
	}
	o.Close()

	o2, err := Load(pinDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o2.Close() })
	got, err := o2.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("after restart:\n got %+v\nwant %+v", got, want)
	}
	if n := o2.polEntries; n != 4 {
		t.Errorf("policy entries after restart = %d, want 4 (stale generation collected)", n)
	}
	hosts, err := o2.HostIPs()
	if err != nil || len(hosts) != 1 || hosts[0] != addr(hostIP) {
		t.Errorf("host ips after restart = %v, %v", hosts, err)
	}
	from2, _ := o2.Programs()
	if got := run(t, from2, tcpPkt(peerA, podIP, 5, 85, tcpSYN).reply(tcpSYN|tcpACK).frame()); got != actPass {
		t.Errorf("reply of a flow tracked before the restart: %s", actName(got))
	}
	// Revisions keep increasing across restarts (two applies before it).
	mustApply(t, o2, p)
	if r := o2.eps[42].rev; r != 3 {
		t.Errorf("revision after restart = %d, want 3", r)
	}
	if err := o2.DeleteEndpoint(42); err != nil {
		t.Fatal(err)
	}
	if fl, _ := o2.Flows(); len(fl) != 0 {
		t.Errorf("flows of a deleted endpoint remain: %+v", fl)
	}
}

// A ring buffer with no room counts every event it could not take, so the
// trace can report the loss: events read + lost = events written.
func TestEventsLost(t *testing.T) {
	bpftest.RequireRoot(t)
	o := loadMaps(t, "", LoadOptions{EventsBytes: 4096}) // the smallest: ~56 records
	_, to := o.Programs()
	mustApply(t, o, *endpoint(true, false, nil, nil)) // ingress default deny
	if n, err := o.EventsLost(); err != nil || n != 0 {
		t.Fatalf("lost before any event: %d, %v", n, err)
	}
	const flows = 200
	for i := range flows {
		run(t, to, tcpPkt(peerB, podIP, uint16(10000+i), 22, tcpSYN).frame()) // one new denied flow each
	}
	rd, err := ringbuf.NewReader(o.EventsMap())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	read := 0
	rd.SetDeadline(time.Now().Add(200 * time.Millisecond))
	for {
		if _, err := rd.Read(); err != nil {
			break
		}
		read++
	}
	lost, err := o.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	if lost == 0 || read+int(lost) != flows {
		t.Errorf("read %d + lost %d, want %d with some lost", read, lost, flows)
	}
}
