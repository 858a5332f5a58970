//go:build linux

package trace

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// PolicyNamer names what the policy datapath's records number.
type PolicyNamer interface {
	// PolicyName is a policy ID's namespace/name.
	PolicyName(id uint32) (string, bool)
	PodNamer
}

// PolicyReader turns the policy datapath's ring buffer (kebpf_np_events)
// into trace events on a Hub.
type PolicyReader struct {
	// Events is the ring buffer map.
	Events *ebpf.Map
	// Lost reads the datapath's count of events it could not write (the
	// ring buffer was full); nil when the datapath has none.
	Lost func() (uint64, error)
	// LostEvery is how often Lost is read (default a second).
	LostEvery time.Duration
	Hub       *Hub
	Node      string
	Namer     PolicyNamer
	Log       *slog.Logger
	// LostFile, when set, keeps the last lost count read (with the ring
	// buffer map's kernel ID) across agents: the next agent's reader
	// reports what the kernel lost while no agent read, rather than taking
	// it as its baseline. It lives beside policy-ids.json, as long as the
	// pins.
	LostFile string
	// Ready, when set, is closed once Namer can name pods. Records wait in
	// the kernel's ring buffer until then: a restarted agent would
	// otherwise publish what the datapath decided while no agent ran (the
	// ring is pinned) before its pod cache is synced, with IPs where the
	// pods' names belong. A ring that fills meanwhile counts its losses.
	Ready <-chan struct{}
}

// Run reads until ctx ends.
func (r *PolicyReader) Run(ctx context.Context) error {
	return ringReader{typ: apiv1.TraceTypePolicy, events: r.Events, lost: r.Lost, lostEvery: r.LostEvery,
		lostFile: r.LostFile, ready: r.Ready,
		hub: r.Hub, log: r.Log, handle: func(raw []byte, clk clock) (apiv1.TraceEvent, error) {
			ev, err := dp.ParseEvent(raw)
			if err != nil {
				return apiv1.TraceEvent{}, err
			}
			return PolicyEvent(ev, r.Node, clk.wall(ev.At), r.Namer), nil
		}}.run(ctx)
}

// PolicyEvent converts one datapath record, naming its policy and pods.
func PolicyEvent(ev dp.Event, node string, at time.Time, n PolicyNamer) apiv1.TraceEvent {
	out := apiv1.TraceEvent{
		Time:        at,
		Node:        node,
		Type:        apiv1.TraceTypePolicy,
		Direction:   "ingress",
		Source:      peer(ev.Src, n),
		Destination: peer(ev.Dst, n),
		Protocol:    protoName(ev.Proto),
	}
	if ev.Dir == dp.Egress {
		out.Direction = "egress"
	}
	switch ev.Verdict {
	case dp.VerdictAllow:
		out.Verdict = apiv1.TraceVerdictAllowed
	case dp.VerdictDeny:
		out.Verdict = apiv1.TraceVerdictDenied
	default:
		out.Verdict = "verdict-" + strconv.Itoa(int(ev.Verdict))
	}
	switch ev.Reason {
	case dp.ReasonPolicy:
		out.Reason = apiv1.TraceReasonPolicy
	case dp.ReasonDefaultDeny:
		out.Reason = apiv1.TraceReasonDefaultDeny
	case dp.ReasonNotEnforced:
		out.Reason = apiv1.TraceReasonNotEnforced
	case dp.ReasonHost:
		out.Reason = apiv1.TraceReasonHost
	case dp.ReasonRevoked:
		out.Reason = apiv1.TraceReasonRevoked
	case dp.ReasonRelated:
		out.Reason = apiv1.TraceReasonRelated
	case dp.ReasonL7Bypass:
		out.Reason = apiv1.TraceReasonL7Bypass
		out.Message = "an L7Policy protects this pod:port: only the node's Envoy may connect to it (a client on another node is not steered yet, so it fails closed)"
	default:
		out.Reason = "reason-" + strconv.Itoa(int(ev.Reason))
	}
	if ev.PolicyID != 0 {
		p := &apiv1.TracePolicy{Kind: "NetworkPolicy"}
		if name, ok := n.PolicyName(ev.PolicyID); ok {
			p.Namespace, p.Name, _ = strings.Cut(name, "/")
		} else {
			p.Unknown, p.ID = true, ev.PolicyID
		}
		if ev.Rule != dp.RuleNone {
			rule := int(ev.Rule)
			p.Rule = &rule
		}
		out.Policy = p
		if ev.Reason == dp.ReasonDefaultDeny {
			who := "the pod"
			if ev.Dir == dp.Egress && out.Source.Pod != "" {
				who = out.Source.Namespace + "/" + out.Source.Pod
			} else if ev.Dir == dp.Ingress && out.Destination.Pod != "" {
				who = out.Destination.Namespace + "/" + out.Destination.Pod
			}
			name := p.Namespace + "/" + p.Name
			if p.Unknown {
				name = fmt.Sprintf("unknown policy ID %d", p.ID)
			}
			out.Message = fmt.Sprintf("default deny of NetworkPolicy %s selecting %s for %s", name, who, out.Direction)
		}
	}
	return out
}

func peer(ap netip.AddrPort, n PodNamer) apiv1.TracePeer {
	p := apiv1.TracePeer{IP: ap.Addr().Unmap().String(), Port: ap.Port()}
	if k, ok := n.PodByIP(ap.Addr()); ok {
		p.Namespace, p.Pod = k.Namespace, k.Name
	}
	return p
}

func protoName(p dp.Proto) string {
	switch p {
	case dp.TCP:
		return "TCP"
	case dp.UDP:
		return "UDP"
	case dp.SCTP:
		return "SCTP"
	case 1:
		return "ICMP"
	case 58:
		return "ICMPv6"
	default:
		return strconv.Itoa(int(p))
	}
}
