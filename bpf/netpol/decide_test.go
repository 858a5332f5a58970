//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// A node's truth table as the agent's compiler writes it (the compiler's own
// tests check NetworkPolicy -> EndpointPolicy; here the question is only
// whether Decide reads these maps as the programs do). Policy IDs: 21 web
// allows app on TCP 80 (a named port "http" resolved) and 8080-8090; 22 web
// allows 10.220.1.0/24 except 10.220.1.128/25 on UDP 53 and SCTP 9000; 23
// db default-deny-all ingress; 24 client egress to web TCP 80 and everywhere
// except 10.0.0.0/8 on UDP 53; 25 web egress ICMP anywhere in 10.220.0.0/16.
const (
	dtHost   = "10.220.0.1"
	dtWeb    = "10.220.0.2"
	dtApp    = "10.220.0.3"
	dtDB     = "10.220.0.4"
	dtClient = "10.220.0.5"
	dtFree   = "10.220.0.6"
	dtWeb6   = "fd00:220::2"
	dtApp6   = "fd00:220::3"
)

func dtEndpoints() []EndpointPolicy {
	one := func(s string) netip.Prefix { a := addr(s); return netip.PrefixFrom(a, a.BitLen()) }
	web := EndpointPolicy{ID: 1, IPs: []netip.Addr{addr(dtWeb), addr(dtWeb6)},
		IngressEnforced: true, EgressEnforced: true, DefaultDenyPolicy: 21,
		Ingress: []PeerEntry{
			{Prefix: one(dtApp), Rules: []PortRule{rule(TCP, 80, 0, 21, 0), rule(TCP, 8080, 8090, 21, 1)}},
			{Prefix: one(dtApp6), Rules: []PortRule{rule(TCP, 80, 0, 21, 0), rule(TCP, 8080, 8090, 21, 1)}},
			// the client is in app's policy's peers too, by another rule
			{Prefix: one(dtClient), Rules: []PortRule{rule(TCP, 80, 0, 21, 0), rule(TCP, 8080, 8090, 21, 1), rule(UDP, 53, 0, 22, 0)}},
			{Prefix: pfx("10.220.1.0/24"), Rules: []PortRule{rule(UDP, 53, 0, 22, 0), rule(SCTP, 9000, 0, 22, 1)}},
			{Prefix: pfx("10.220.1.128/25")}, // except
		},
		Egress: []PeerEntry{{Prefix: pfx("10.220.0.0/16"), Rules: []PortRule{rule(AnyProto, 0, 0, 25, 0)}},
			{Prefix: pfx("10.220.0.4/32"), Rules: []PortRule{rule(PortProtoICMP, 0, 0, 25, 0)}}},
	}
	db := EndpointPolicy{ID: 2, IPs: []netip.Addr{addr(dtDB)}, IngressEnforced: true, DefaultDenyPolicy: 23}
	client := EndpointPolicy{ID: 3, IPs: []netip.Addr{addr(dtClient)}, EgressEnforced: true, DefaultDenyPolicy: 24,
		Egress: []PeerEntry{
			{Prefix: pfx("0.0.0.0/0"), Rules: []PortRule{rule(UDP, 53, 0, 24, 1)}},
			{Prefix: pfx("10.0.0.0/8")},
			{Prefix: one(dtWeb), Rules: []PortRule{rule(TCP, 80, 0, 24, 0)}},
		}}
	app := EndpointPolicy{ID: 4, IPs: []netip.Addr{addr(dtApp), addr(dtApp6)}}
	free := EndpointPolicy{ID: 5, IPs: []netip.Addr{addr(dtFree)}}
	return []EndpointPolicy{web, db, client, app, free}
}

// PortProtoICMP is IPv4 ICMP as a rule protocol (NetworkPolicy cannot say
// it, the datapath can: it keeps the table honest about port-less protocols).
const PortProtoICMP Proto = 1

type dtProbe struct {
	proto Proto
	port  uint16
}

// TestDecideAgreesWithPrograms: for every local pod, direction, peer,
// protocol and port of the truth table, the real from/to program's verdict,
// reason, policy and rule (from its event) equal Decide's answer from the
// same maps.
func TestDecideAgreesWithPrograms(t *testing.T) {
	bpftest.RequireRoot(t)
	eps := dtEndpoints()
	peers4 := []string{dtHost, dtWeb, dtApp, dtDB, dtClient, dtFree, "10.220.1.7", "10.220.1.200", "10.9.9.9", "192.0.2.1"}
	peers6 := []string{dtWeb6, dtApp6, "fd00:220::99", "2001:db8::1"}
	probes := []dtProbe{{TCP, 80}, {TCP, 81}, {TCP, 8080}, {TCP, 8090}, {TCP, 8091}, {UDP, 53}, {UDP, 54}, {SCTP, 9000}, {SCTP, 9001}, {PortProtoICMP, 0}}
	probes6 := []dtProbe{{TCP, 80}, {TCP, 8085}, {UDP, 53}}

	seen := map[string]int{}
	checked := 0
	for judged := range eps {
		o := loadMaps(t, "", LoadOptions{})
		from, to := o.Programs()
		for i, ep := range eps {
			// The judged pod sits on the test run's ifindex; the others on
			// interfaces that exist only in the maps.
			ep.IfIndex = 100 + i
			if i == judged {
				ep.IfIndex = testIfindex
			}
			mustApply(t, o, ep)
		}
		if err := o.SetHostIPs([]netip.Addr{addr(dtHost)}); err != nil {
			t.Fatal(err)
		}
		rd, err := ringbuf.NewReader(o.EventsMap())
		if err != nil {
			t.Fatal(err)
		}
		sport := uint16(20000)
		for _, local := range eps[judged].IPs {
			peers, prs := peers4, probes
			if local.Is6() {
				peers, prs = peers6, probes6
			}
			for _, peerS := range peers {
				pa := addr(peerS)
				if pa == local {
					continue
				}
				for _, dir := range []Direction{Ingress, Egress} {
					for _, pr := range prs {
						sport++
						q := Question{Src: pa, Dst: local, DstPort: pr.port, Proto: pr.proto, Dir: dir}
						if dir == Egress {
							q.Src, q.Dst = local, pa
						}
						var p pkt
						switch pr.proto {
						case TCP:
							p = tcpPkt(q.Src.String(), q.Dst.String(), sport, pr.port, tcpSYN)
						case UDP:
							p = udpPkt(q.Src.String(), q.Dst.String(), sport, pr.port)
						case SCTP:
							p = sctpPkt(q.Src.String(), q.Dst.String(), sport, pr.port)
						default:
							p = icmpPkt(q.Src.String(), q.Dst.String(), 8, sport)
						}
						prog := to
						if dir == Egress {
							prog = from
						}
						act := run(t, prog, p.frame())
						rd.SetDeadline(time.Now())
						rec, rerr := rd.Read()
						got, derr := o.Decide(q)
						name := fmt.Sprintf("%s %s->%s %d/%d", map[Direction]string{Ingress: "ingress", Egress: "egress"}[dir], q.Src, q.Dst, pr.proto, pr.port)
						if derr != nil {
							t.Errorf("%s: Decide: %v", name, derr)
							continue
						}
						checked++
						seen[fmt.Sprintf("verdict %d reason %d", got.Verdict, got.Reason)]++
						wantAct := actPass
						if got.Verdict == VerdictDeny {
							wantAct = actDrop
						}
						if act != wantAct {
							t.Errorf("%s: program %s, Decide %+v", name, actName(act), got)
						}
						if rerr != nil {
							// No event: only an endpoint enforced in no
							// direction passes unjudged.
							if !errors.Is(rerr, os.ErrDeadlineExceeded) {
								t.Fatalf("%s: read event: %v", name, rerr)
							}
							if got.Reason != ReasonNotEnforced || eps[judged].IngressEnforced || eps[judged].EgressEnforced {
								t.Errorf("%s: no event from the program, Decide %+v", name, got)
							}
							continue
						}
						ev, err := ParseEvent(rec.RawSample)
						if err != nil {
							t.Fatal(err)
						}
						fromProg := Decision{Endpoint: ev.Endpoint, Verdict: ev.Verdict, Reason: ev.Reason, PolicyID: ev.PolicyID, Rule: ev.Rule}
						if fromProg != got || ev.Dir != dir {
							t.Errorf("%s: program %+v (dir %d), Decide %+v", name, fromProg, ev.Dir, got)
						}
						if rd.SetDeadline(time.Now()); true {
							if extra, err := rd.Read(); err == nil {
								t.Errorf("%s: a second event %x", name, extra.RawSample[:24])
							}
						}
					}
				}
			}
		}
		rd.Close()
	}
	t.Logf("%d questions checked (verdict/reason counts): %v", checked, seen)
	// The table must exercise every verdict Decide can give.
	for _, k := range []string{
		fmt.Sprintf("verdict %d reason %d", VerdictAllow, ReasonPolicy),
		fmt.Sprintf("verdict %d reason %d", VerdictDeny, ReasonDefaultDeny),
		fmt.Sprintf("verdict %d reason %d", VerdictAllow, ReasonNotEnforced),
		fmt.Sprintf("verdict %d reason %d", VerdictAllow, ReasonHost),
	} {
		if seen[k] == 0 {
			t.Errorf("the table never produced %s", k)
		}
	}

	// A pod that is not local is a clear error, not a verdict.
	o := loadMaps(t, "", LoadOptions{})
	if _, err := o.Decide(Question{Src: addr("10.9.9.9"), Dst: addr(dtWeb), DstPort: 80, Proto: TCP, Dir: Ingress}); !errors.Is(err, ErrNoEndpoint) {
		t.Errorf("Decide for a pod with no endpoint: %v, want ErrNoEndpoint", err)
	}
}
