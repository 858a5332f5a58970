//go:build linux

package netpol

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// DirCounters are one direction's counts.
type DirCounters struct {
	Allowed uint64 // packets passed
	Denied  uint64 // packets dropped
	Flows   uint64 // new flows allowed
}

// Counters are an endpoint's counts since it was first applied, summed over CPUs.
type Counters struct {
	Ingress DirCounters
	Egress  DirCounters
}

// Counters reads endpoint id's counters.
func (o *Objects) Counters(id uint32) (Counters, error) {
	var per []NetpolEpCounters
	if err := o.objs.KebpfNpCnt.Lookup(id, &per); err != nil {
		return Counters{}, fmt.Errorf("lookup counters of endpoint %d: %w", id, err)
	}
	var c Counters
	for _, x := range per {
		c.Ingress.Allowed += x.Allow[Ingress]
		c.Ingress.Denied += x.Deny[Ingress]
		c.Ingress.Flows += x.Flows[Ingress]
		c.Egress.Allowed += x.Allow[Egress]
		c.Egress.Denied += x.Deny[Egress]
		c.Egress.Flows += x.Flows[Egress]
	}
	return c, nil
}

// Flow is a tracked or decided flow as the maps record it.
type Flow struct {
	Endpoint uint32
	Proto    Proto
	// Src/Dst are the originator and responder when the flow is tracked
	// (conntrack knows who started it), else the key's canonical order.
	Src, Dst netip.AddrPort
}

func ctFlow(k NetpolCtKey, origA bool) Flow {
	a := netip.AddrPortFrom(wordsAddr(k.Family, k.A), be16(k.Pa))
	b := netip.AddrPortFrom(wordsAddr(k.Family, k.B), be16(k.Pb))
	if !origA {
		a, b = b, a
	}
	return Flow{Endpoint: k.EpId, Proto: Proto(k.Proto), Src: a, Dst: b}
}

// TrackedFlow is one conntrack entry.
type TrackedFlow struct {
	Flow
	Dir      Direction // of the first packet
	PolicyID uint32
	Rule     uint16
	LastSeen time.Duration // CLOCK_MONOTONIC (bpf_ktime_get_ns)
	Closing  bool          // RST or FIN both ways seen
}

// Flows lists the conntrack entries (for tests and debugging; it walks the
// whole table).
func (o *Objects) Flows() ([]TrackedFlow, error) {
	return readAll(o.objs.KebpfNpCt, NetpolMapKebpfNpCt, func(k NetpolCtKey, v NetpolCtVal) TrackedFlow {
		return TrackedFlow{
			Flow: ctFlow(k, v.OrigA == 1), Dir: Direction(v.OrigDir), PolicyID: v.PolicyId, Rule: v.Rule,
			LastSeen: time.Duration(v.LastSeen), Closing: v.Rst == 1 || v.FinOrig == 1 && v.FinReply == 1,
		}
	})
}

// Verdict is the last decision recorded for a flow.
type Verdict struct {
	Flow     // Src/Dst in canonical order
	Dir      Direction
	Verdict  uint8 // VerdictAllow / VerdictDeny
	Reason   uint8 // Reason*
	PolicyID uint32
	Rule     uint16
	At       time.Duration // CLOCK_MONOTONIC
}

// Verdicts lists the last-verdict map (for the trace feature and tests).
func (o *Objects) Verdicts() ([]Verdict, error) {
	return readAll(o.objs.KebpfNpVerd, NetpolMapKebpfNpVerd, func(k NetpolCtKey, v NetpolVerdictVal) Verdict {
		return Verdict{Flow: ctFlow(k, true), Dir: Direction(v.Dir), Verdict: v.Verdict, Reason: v.Reason,
			PolicyID: v.PolicyId, Rule: v.Rule, At: time.Duration(v.Ts)}
	})
}

// readAll decodes every entry of m (named name) with conv: a walk of the
// whole map.
func readAll[K, V, T any](m *ebpf.Map, name string, conv func(K, V) T) ([]T, error) {
	var k K
	var v V
	var out []T
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, conv(k, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return out, nil
}

// Slots of kebpf_np_l7; keep in sync with L7_* in netpol.c.
const (
	l7Allowed = iota
	l7DenyEgress
	l7DenyIngress
	l7Envoy
	l7Bypass
	l7Max
)

// L7Counters count the checks that keep L7 steering (bpf/sockmap) from
// widening L3/L4, node-wide since the map was created, summed over CPUs.
// Each counts connection-opening SYNs (retransmissions included).
type L7Counters struct {
	// Allowed: steered client SYNs (to Envoy) whose original pair both
	// the client's egress and the destination's ingress policy allow.
	Allowed uint64
	// DeniedEgress / DeniedIngress: steered client SYNs dropped because the
	// client's egress / the original destination's ingress policy denies
	// the original pair.
	DeniedEgress  uint64
	DeniedIngress uint64
	// Envoy: SYNs from Envoy's sockets to a steered pod:port, passed on to
	// the usual checks.
	Envoy uint64
	// Bypass: SYNs to a steered pod:port from any other socket, dropped
	// (ReasonL7Bypass).
	Bypass uint64
}

// L7Counters reads the L7 check counters.
func (o *Objects) L7Counters() (L7Counters, error) {
	s, err := pins.SumPerCPU(o.objs.KebpfNpL7, NetpolMapKebpfNpL7, l7Max)
	if err != nil {
		return L7Counters{}, err
	}
	return L7Counters{Allowed: s[l7Allowed], DeniedEgress: s[l7DenyEgress], DeniedIngress: s[l7DenyIngress],
		Envoy: s[l7Envoy], Bypass: s[l7Bypass]}, nil
}
