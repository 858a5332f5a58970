package trace

import (
	"net/netip"

	"k8s.io/apimachinery/pkg/types"
)

// PodNamer names the pod holding an IP (any pod of the cluster that is not
// hostNetwork).
type PodNamer interface {
	PodByIP(ip netip.Addr) (types.NamespacedName, bool)
}

// CgroupNamer names the pod and container of a cgroup v2 id
// (bpf_get_current_cgroup_id) for pods on this node.
type CgroupNamer interface {
	// PodByCgroup returns the pod and the container name ("" for the pod's
	// own cgroup, or a container the pod's status does not list yet).
	PodByCgroup(id uint64) (pod types.NamespacedName, container string, ok bool)
}
