//go:build linux

package trace

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/cilium/ebpf"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// ServiceNamer names the socket LB's service IDs.
type ServiceNamer interface {
	// ServicePort is the Service and port name (empty for an unnamed
	// port) that a datapath service ID stands for.
	ServicePort(id uint32) (svc types.NamespacedName, port string, ok bool)
}

// Reasons of lb events (TraceEvent.Reason).
const (
	ReasonNoEndpoints    = "no-endpoints"
	ReasonBackendRemoved = "backend-removed"
)

// LBReader turns the socket LB's ring buffer (kebpf_lb_events) into trace
// events on a Hub.
type LBReader struct {
	// Events is the ring buffer map.
	Events *ebpf.Map
	// Lost reads kebpf_lb_lost (nil: the datapath has none).
	Lost func() (uint64, error)
	// LostEvery is how often Lost is read (default a second).
	LostEvery time.Duration
	Hub       *Hub
	Node      string
	Services  ServiceNamer
	Pods      PodNamer
	Cgroups   CgroupNamer
	// LostFile and Ready: see ringReader.
	LostFile string
	Ready    <-chan struct{}
	Log      *slog.Logger
}

// Run reads until ctx ends.
func (r *LBReader) Run(ctx context.Context) error {
	return ringReader{typ: apiv1.TraceTypeLB, events: r.Events, lost: r.Lost, lostEvery: r.LostEvery,
		lostFile: r.LostFile, ready: r.Ready, hub: r.Hub, log: r.Log, handle: func(raw []byte, clk clock) (apiv1.TraceEvent, error) {
			ev, err := socklb.ParseEvent(raw)
			if err != nil {
				return apiv1.TraceEvent{}, err
			}
			return LBEvent(ev, r.Node, clk.wall(ev.At), r.Services, r.Pods, r.Cgroups), nil
		}}.run(ctx)
}

// LBEvent converts one socket LB record: the Service by its ID, the
// backend pod by its IP, and the calling process's pod by its cgroup.
// connect() decides before the socket has a source address: Source's IP is
// the client pod's address of the dialed family when its cgroup is a known
// pod's, else empty.
func LBEvent(ev socklb.Event, node string, at time.Time, svcs ServiceNamer, pods PodNamer, cgs CgroupNamer) apiv1.TraceEvent {
	out := apiv1.TraceEvent{
		Time:     at,
		Node:     node,
		Type:     apiv1.TraceTypeLB,
		Protocol: protoName(dpProto(ev.Proto)),
		Service:  &apiv1.TraceService{IP: ev.Frontend.Addr().String(), PortNumber: ev.Frontend.Port()},
		Process:  &apiv1.TraceProcess{PID: ev.PID, Command: ev.Comm, CgroupID: ev.CgroupID},
	}
	if svcs != nil {
		if k, port, ok := svcs.ServicePort(ev.ServiceID); ok {
			out.Service.Namespace, out.Service.Name, out.Service.Port = k.Namespace, k.Name, port
		}
	}
	if out.Service.Name == "" {
		out.Message = fmt.Sprintf("service id %d is unknown to this agent", ev.ServiceID)
	}
	switch ev.Verdict {
	case socklb.VerdictTranslated:
		out.Verdict = apiv1.TraceVerdictTranslated
		out.Destination = peer(ev.Backend, pods)
	case socklb.VerdictRefused:
		out.Verdict = apiv1.TraceVerdictRefused
		out.Reason = ReasonNoEndpoints
		out.Destination = apiv1.TracePeer{IP: ev.Frontend.Addr().String(), Port: ev.Frontend.Port()}
	case socklb.VerdictDestroyed:
		out.Verdict = apiv1.TraceVerdictDestroyed
		out.Reason = ReasonBackendRemoved
		out.Destination = peer(ev.Backend, pods)
	default:
		out.Verdict = ev.Verdict.String()
	}
	nameSourceByCgroup(&out, cgs, ev.CgroupID, ev.Frontend.Addr().Is4())
	return out
}

func dpProto(p socklb.Proto) dp.Proto { return dp.Proto(p) }
