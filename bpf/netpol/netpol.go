//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

const (
	// FromProgramName runs on the host-side veth's ingress: traffic from
	// the pod (the pod's egress).
	FromProgramName = NetpolProgKebpfNpFrom
	// ToProgramName runs on the host-side veth's egress: traffic to the pod
	// (the pod's ingress).
	ToProgramName = NetpolProgKebpfNpTo
	// LinkPinPrefix prefixes the link pins: <pinDir>/links/np_<ifindex>_{from,to}.
	LinkPinPrefix = "np_"
	// MaxEndpointIPs is how many pod addresses an endpoint may list (one per
	// family is all Kubernetes assigns; the rest is headroom).
	MaxEndpointIPs = 4
)

// Verdicts and reasons of Event and Verdict records; keep in sync with
// VERDICT_* and REASON_* in netpol.c.
const (
	VerdictAllow uint8 = 1
	VerdictDeny  uint8 = 2

	ReasonPolicy      uint8 = 0 // a rule allowed it (PolicyID, Rule)
	ReasonDefaultDeny uint8 = 1 // no rule allowed it (PolicyID = DefaultDenyPolicy)
	ReasonNotEnforced uint8 = 2 // no policy selects the pod in this direction
	ReasonHost        uint8 = 3 // the peer is a node address
	ReasonRevoked     uint8 = 4 // established flow denied after a policy change
	ReasonRelated     uint8 = 5 // ICMP error of a tracked flow
	// ReasonL7Bypass: a SYN to a pod IP:port that bpf/sockmap steers to
	// Envoy, from a socket that is not Envoy's (dropped).
	ReasonL7Bypass uint8 = 6

	// RuleNone is the rule index of verdicts no rule made.
	RuleNone uint16 = 0xffff
)

// epState is what the agent last applied to one endpoint.
type epState struct {
	policy EndpointPolicy
	gen    uint8
	rev    uint32
	// keys of the live generation, sorted by prefix length (delete order).
	keys []NetpolPolKey
}

// Objects is the loaded datapath. It implements Datapath.
type Objects struct {
	mu     sync.Mutex
	objs   NetpolObjects
	pinDir string
	opts   LoadOptions
	eps    map[uint32]*epState
	// mode is opts.Attach resolved: AttachTCX or AttachClsact.
	mode AttachMode
	// links by ifindex: [0] from (tcx ingress), [1] to (tcx egress).
	links map[int][2]link.Link
	// filters marks the ifindexes this process put its programs' clsact
	// filters on (AttachClsact).
	filters map[int]bool
	// polEntries counts kebpf_np_pol entries of all live generations.
	polEntries int
	// rev is the last revision handed out; revisions are node-wide so a
	// recycled endpoint ID never matches a stale flow entry's revision.
	rev uint32
}

var _ Datapath = (*Objects)(nil)

// Programs returns the from (pod egress) and to (pod ingress) programs, for
// tests and introspection.
func (o *Objects) Programs() (from, to *ebpf.Program) {
	return o.objs.KebpfNpFrom, o.objs.KebpfNpTo
}

// Close releases this process's handles. Pinned links and maps stay, so
// enforcement continues while the agent restarts; use Detach to remove it.
func (o *Objects) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var errs []error
	for ifindex, held := range o.links {
		for _, l := range held {
			if l != nil {
				if err := l.Close(); err != nil {
					errs = append(errs, fmt.Errorf("close link: %w", err))
				}
			}
		}
		delete(o.links, ifindex)
	}
	// Filters hold their program themselves: nothing to release.
	clear(o.filters)
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// Detach removes enforcement from every interface and deletes all state:
// links, clsact filters (those of every interface in the caller's network
// namespace), map pins, maps. Established connections keep flowing (nothing
// drops once the programs are gone). This is `disable policy`.
func (o *Objects) Detach() error {
	o.mu.Lock()
	var errs []error
	for ifindex := range o.links {
		if err := o.detachLinks(ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	clear(o.filters)
	o.mu.Unlock()
	if err := detachPinnedLinks(o.pinDir); err != nil {
		errs = append(errs, err)
	}
	if !o.opts.noAttach {
		if err := detachAllClsact(); err != nil {
			errs = append(errs, fmt.Errorf("detach clsact filters: %w", err))
		}
	}
	// The shared L7 maps stay pinned and untouched (pins.go).
	for _, m := range []*ebpf.Map{o.objs.KebpfNpEp, o.objs.KebpfNpPol, o.objs.KebpfNpCt, o.objs.KebpfNpHost,
		o.objs.KebpfNpCnt, o.objs.KebpfNpVerd, o.objs.KebpfNpEvents, o.objs.KebpfNpIp, o.objs.KebpfNpL7, o.objs.KebpfNpLost} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", m, err))
		}
	}
	o.mu.Lock()
	o.eps = map[uint32]*epState{}
	o.polEntries = 0
	o.mu.Unlock()
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}
