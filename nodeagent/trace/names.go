package trace

import (
	"net/netip"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// PodNamer names a pod by one of its IPs. The agent's pod index implements
// it; a nil PodNamer names nothing (events then carry IPs only).
type PodNamer interface {
	PodByIP(netip.Addr) (types.NamespacedName, bool)
}

// namePeer is a peer named by pods when it knows the IP; pods may be nil.
func namePeer(ap netip.AddrPort, pods PodNamer) apiv1.TracePeer {
	if !ap.IsValid() {
		return apiv1.TracePeer{}
	}
	p := apiv1.TracePeer{IP: ap.Addr().Unmap().String(), Port: ap.Port()}
	if pods == nil {
		return p
	}
	if k, ok := pods.PodByIP(ap.Addr().Unmap()); ok {
		p.Namespace, p.Pod = k.Namespace, k.Name
	}
	return p
}

// CgroupNamer names the pod and container of a cgroup v2 id
// (bpf_get_current_cgroup_id) for pods on this node.
type CgroupNamer interface {
	// PodByCgroup returns the pod and the container name ("" for the pod's
	// own cgroup, or a container the pod's status does not list yet).
	PodByCgroup(id uint64) (pod types.NamespacedName, container string, ok bool)
}

// cgroupIPNamer is a CgroupNamer that also knows the pod's IPs
// (nodeagent/podindex is one).
type cgroupIPNamer interface {
	PodByCgroupIPs(id uint64) (pod types.NamespacedName, container string, ips []netip.Addr, ok bool)
}

// nameSourceByCgroup names an event's Source (and Process.Container) by
// the connecting process's cgroup: socket hooks decide before the socket
// has a source address, so the pod's address of the dialed family (v4) is
// the one the connection leaves from. cgs may be nil.
func nameSourceByCgroup(out *apiv1.TraceEvent, cgs CgroupNamer, id uint64, v4 bool) {
	if cgs == nil {
		return
	}
	if withIPs, ok := cgs.(cgroupIPNamer); ok {
		if p, container, ips, ok := withIPs.PodByCgroupIPs(id); ok {
			out.Source.Namespace, out.Source.Pod = p.Namespace, p.Name
			if out.Process != nil {
				out.Process.Container = container
			}
			if out.Source.IP == "" {
				for _, ip := range ips {
					if ip.Is4() == v4 {
						out.Source.IP = ip.String()
						break
					}
				}
			}
		}
	} else if p, container, ok := cgs.PodByCgroup(id); ok {
		out.Source.Namespace, out.Source.Pod = p.Namespace, p.Name
		if out.Process != nil {
			out.Process.Container = container
		}
	}
}
