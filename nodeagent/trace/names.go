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
