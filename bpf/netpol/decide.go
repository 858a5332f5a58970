//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// ErrNoEndpoint: the pod the question is about (the source for Egress, the
// destination for Ingress) is no endpoint of this node's datapath, so no
// program of this node judges that side.
var ErrNoEndpoint = errors.New("no local policy endpoint")

// Question is a new flow's first packet as the datapath sees it on one side.
type Question struct {
	Src, Dst netip.Addr
	// DstPort is the destination port (TCP, UDP, SCTP); other protocols
	// have no ports and match only rules for every port.
	DstPort uint16
	Proto   Proto
	// Dir is the side judged: Egress is the source pod's from program,
	// Ingress the destination pod's to program.
	Dir Direction
}

// Decision is the verdict the datapath gives a Question's new flow.
type Decision struct {
	Endpoint uint32 // endpoint ID of the judged pod
	Verdict  uint8  // VerdictAllow / VerdictDeny
	Reason   uint8  // ReasonPolicy, ReasonDefaultDeny, ReasonNotEnforced or ReasonHost
	PolicyID uint32 // deciding policy; for default deny ep's DefaultDenyPolicy; 0: none
	Rule     uint16 // deciding rule index, RuleNone if no rule decided
}

// Decide answers q from the pinned maps the programs read (kebpf_np_ip,
// kebpf_np_ep, kebpf_np_host, kebpf_np_pol), following handle() and
// evaluate() in netpol.c for a new flow: enforced in no direction, then
// node address, then not enforced in q.Dir, then the longest matching prefix of the live generation and its first
// matching rule, else the endpoint's default deny. It reads, never writes.
//
// Not modelled, because they are not policy verdicts on a new flow: flows
// conntrack already holds (they keep their verdict until a policy change
// re-judges them), ICMP errors of tracked flows, malformed packets, and the
// L7 steering checks (a SYN to a pod:port steered to Envoy is judged as
// client -> original destination, which is this same question).
func (o *Objects) Decide(q Question) (Decision, error) {
	if !q.Src.IsValid() || !q.Dst.IsValid() {
		return Decision{}, errors.New("decide: invalid address")
	}
	src, dst := q.Src.Unmap(), q.Dst.Unmap()
	if src.Is4() != dst.Is4() {
		return Decision{}, fmt.Errorf("decide: %s and %s are of different families", src, dst)
	}
	local, peer := dst, src
	if q.Dir == Egress {
		local, peer = src, dst
	}
	var ifindex uint32
	if err := o.objs.KebpfNpIp.Lookup(addrKey(local), &ifindex); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Decision{}, fmt.Errorf("decide: %s: %w", local, ErrNoEndpoint)
		}
		return Decision{}, fmt.Errorf("decide: read %s: %w", NetpolMapKebpfNpIp, err)
	}
	var ep NetpolEpVal
	if err := o.objs.KebpfNpEp.Lookup(ifindex, &ep); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Decision{}, fmt.Errorf("decide: %s (ifindex %d): %w", local, ifindex, ErrNoEndpoint)
		}
		return Decision{}, fmt.Errorf("decide: read %s: %w", NetpolMapKebpfNpEp, err)
	}
	d := Decision{Endpoint: ep.Id, Rule: RuleNone}

	// handle(): an endpoint no policy selects in either direction passes
	// before anything else. One enforced in the other direction only goes
	// on to the node-address check, and evaluate() says not-enforced after.
	if ep.Flags&(1<<Ingress|1<<Egress) == 0 {
		d.Verdict, d.Reason = VerdictAllow, ReasonNotEnforced
		return d, nil
	}
	var one uint8
	err := o.objs.KebpfNpHost.Lookup(addrKey(peer), &one)
	switch {
	case err == nil:
		d.Verdict, d.Reason = VerdictAllow, ReasonHost
		return d, nil
	case !errors.Is(err, ebpf.ErrKeyNotExist):
		return Decision{}, fmt.Errorf("decide: read %s: %w", NetpolMapKebpfNpHost, err)
	}

	if ep.Flags&(1<<q.Dir) == 0 {
		d.Verdict, d.Reason = VerdictAllow, ReasonNotEnforced
		return d, nil
	}
	fam, b := addrBytes(peer)
	bits := 32
	if fam == fam6 {
		bits = 128
	}
	k := NetpolPolKey{Prefixlen: uint32(polPrefixBase + bits), EpId: ep.Id, Dir: uint8(q.Dir), Gen: ep.Gen, Family: fam, Addr: b}
	var v NetpolPolVal
	err = o.objs.KebpfNpPol.Lookup(k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		// As in evaluate(): an apply may have flipped the generation and
		// be deleting the one we read.
		var now NetpolEpVal
		if o.objs.KebpfNpEp.Lookup(ifindex, &now) == nil && now.Gen != k.Gen && now.Id == k.EpId {
			k.Gen = now.Gen
			err = o.objs.KebpfNpPol.Lookup(k, &v)
		}
	}
	found := err == nil
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return Decision{}, fmt.Errorf("decide: read %s: %w", NetpolMapKebpfNpPol, err)
	}
	hasPorts := q.Proto == TCP || q.Proto == UDP || q.Proto == SCTP
	if found {
		for i := 0; i < int(v.N) && i < MaxRulesPerPrefix; i++ {
			r := v.Rules[i]
			if r.Proto != 0 && Proto(r.Proto) != q.Proto {
				continue
			}
			if r.PortLo != 0 || r.PortHi != 0 {
				if !hasPorts || q.DstPort < r.PortLo || q.DstPort > r.PortHi {
					continue
				}
			}
			d.Verdict, d.Reason, d.PolicyID, d.Rule = VerdictAllow, ReasonPolicy, r.PolicyId, r.Idx
			return d, nil
		}
	}
	d.Verdict, d.Reason, d.PolicyID = VerdictDeny, ReasonDefaultDeny, ep.DenyPolicy
	return d, nil
}
