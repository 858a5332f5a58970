package trace

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
)

// CNIEvent is the trace event of one sandbox the CNI plugin held until the
// agent answered (cni.Handler's decided callback). The event is about the
// pod itself, so Source and Destination both name it: --pod, --from-pod and
// --to-pod all find it, and its IP is the one the previous plugin assigned
// (the first, IPv4 first; Message lists them all when there are more).
func CNIEvent(d cni.Decision, node string, at time.Time) apiv1.TraceEvent {
	p := apiv1.TracePeer{Namespace: d.Request.Namespace, Pod: d.Request.Name, IP: firstIP(d.Request.IPs)}
	out := apiv1.TraceEvent{
		Time:        at.UTC(),
		Node:        node,
		Type:        apiv1.TraceTypeCNI,
		Source:      p,
		Destination: p,
	}
	held := d.Held.Round(time.Microsecond)
	if d.Err != nil {
		out.Verdict = apiv1.TraceVerdictRefused
		out.Reason = d.Reason
		if out.Reason == "" {
			out.Reason = cni.RefusalReason(d.Err)
		}
		out.Message = d.Err.Error()
		return out
	}
	out.Verdict = apiv1.TraceVerdictAdmitted
	r := d.Response
	switch {
	case !r.Enforced:
		out.Message = fmt.Sprintf("held %s; the policy feature is off on this node, nothing to program", held)
	case r.Endpoint == 0:
		out.Message = fmt.Sprintf("held %s; no endpoint (a hostNetwork pod)", held)
	default:
		out.Message = fmt.Sprintf("held %s until endpoint %d was programmed (ingress %s, egress %s)",
			held, r.Endpoint, enforced(r.Ingress), enforced(r.Egress))
	}
	if len(d.Request.IPs) > 1 {
		out.Message += "; IPs " + strings.Join(d.Request.IPs, ", ")
	}
	return out
}

func enforced(b bool) string {
	if b {
		return "enforced"
	}
	return "not enforced"
}

// firstIP is the first IPv4 address of ips, else the first one (as given
// when it does not parse).
func firstIP(ips []string) string {
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil && a.Unmap().Is4() {
			return a.Unmap().String()
		}
	}
	if len(ips) > 0 {
		return ips[0]
	}
	return ""
}
