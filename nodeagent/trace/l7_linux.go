//go:build linux

package trace

import (
	"context"
	"log/slog"
	"strconv"
	"time"

	"github.com/cilium/ebpf"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
)

// Reasons of refused l7 connect events.
const (
	L7ReasonNoEnvoy = "no-envoy" // no ready Envoy on the node: fail closed
	L7ReasonNoRoom  = "no-room"  // the original destination could not be remembered
)

// L7Reader turns the steering datapath's ring buffer (kebpf_l7_events)
// into l7 trace events: one per connect() to an L7-selected destination,
// steered to Envoy or refused.
type L7Reader struct {
	Events *ebpf.Map
	// Lost reads kebpf_l7_lost (sockmap Objects.EventsLost).
	Lost func() (uint64, error)
	Hub  *Hub
	Node string
	// Pods names destinations (and bound sources) by IP; nil: IPs only.
	Pods PodNamer
	// Cgroups names the connecting pod and container by the process's
	// cgroup (connect() decides before the socket has a source address).
	Cgroups CgroupNamer
	// LostFile and Ready: see ringReader.
	LostFile string
	Ready    <-chan struct{}
	Log      *slog.Logger
}

// Run reads until ctx ends.
func (r *L7Reader) Run(ctx context.Context) error {
	return ringReader{typ: apiv1.TraceTypeL7, events: r.Events, lost: r.Lost, hub: r.Hub, log: r.Log,
		lostFile: r.LostFile, ready: r.Ready,
		handle: func(raw []byte, clk clock) (apiv1.TraceEvent, error) {
			ev, err := sockmap.ParseEvent(raw)
			if err != nil {
				return apiv1.TraceEvent{}, err
			}
			return L7ConnectEvent(ev, r.Node, clk.wall(ev.At), r.Pods, r.Cgroups), nil
		}}.run(ctx)
}

// L7ConnectEvent converts one steering record. The source of a connect()
// is known only when the socket was bound before it (the kernel picks the
// address after the hook): otherwise Source is empty and Process says who
// connected.
func L7ConnectEvent(ev sockmap.Event, node string, at time.Time, pods PodNamer, cgs CgroupNamer) apiv1.TraceEvent {
	out := apiv1.TraceEvent{
		Time:        at,
		Node:        node,
		Type:        apiv1.TraceTypeL7,
		Protocol:    "TCP",
		Destination: namePeer(ev.Dst, pods),
		Process:     &apiv1.TraceProcess{PID: ev.TGID, Command: ev.Comm, CgroupID: ev.CgroupID},
	}
	if ev.Src.IsValid() {
		out.Source = namePeer(ev.Src, pods)
	}
	nameSourceByCgroup(&out, cgs, ev.CgroupID, ev.Dst.Addr().Unmap().Is4())
	switch ev.Verdict {
	case sockmap.EventSteered:
		out.Verdict = apiv1.TraceVerdictRedirected
		out.Message = "connect() steered to this node's Envoy"
	case sockmap.EventNoEnvoy:
		out.Verdict = apiv1.TraceVerdictRefused
		out.Reason = L7ReasonNoEnvoy
		out.Message = "connect() refused (EPERM): an L7Policy selects the destination and no Envoy is ready on this node (fail closed)"
	case sockmap.EventNoRoom:
		out.Verdict = apiv1.TraceVerdictRefused
		out.Reason = L7ReasonNoRoom
		out.Message = "connect() refused (EPERM): the datapath could not record the original destination"
	default:
		out.Verdict = "verdict-" + strconv.Itoa(int(ev.Verdict))
	}
	return out
}
