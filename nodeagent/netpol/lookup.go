package netpol

import (
	"net/netip"
	"sort"

	"k8s.io/apimachinery/pkg/types"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// PodInfo is what the policy sync knows of one pod, for `trace policy`.
type PodInfo struct {
	IPs []netip.Addr
	// Local: this node enforces policy for the pod (IsLocalEndpoint).
	Local bool
}

// Pod looks a pod up by name in the sync's cache (the reverse of PodByIP);
// false when there is no such pod or the caches are not synced yet.
func (s *Syncer) Pod(k types.NamespacedName) (PodInfo, bool) {
	select {
	case <-s.synced:
	default:
		return PodInfo{}, false
	}
	pod, err := s.podLister.Pods(k.Namespace).Get(k.Name)
	if err != nil || pod == nil {
		return PodInfo{}, false
	}
	return PodInfo{IPs: PodIPs(pod), Local: IsLocalEndpoint(pod, s.opts.NodeName)}, true
}

// SelectedBy lists namespace/name of the policies selecting pod k in
// direction dir, sorted: the policies whose default deny would apply.
func (s *Syncer) SelectedBy(k types.NamespacedName, dir dp.Direction) []string {
	select {
	case <-s.synced:
	default:
		return nil
	}
	pod, err := s.podLister.Pods(k.Namespace).Get(k.Name)
	if err != nil || pod == nil {
		return nil
	}
	var out []string
	for _, p := range (listerSource{s}).Policies(k.Namespace) {
		ing, egr := PolicyTypes(p)
		if (dir == dp.Ingress && !ing) || (dir == dp.Egress && !egr) || !Selects(p, pod) {
			continue
		}
		out = append(out, policyKey(p))
	}
	sort.Strings(out)
	return out
}

// Synced reports whether a full sync has written the datapath without
// error since the sync started: before, the maps may still hold another
// agent's (or no) state, and an explanation from them could be stale.
func (s *Syncer) Synced() bool { return s.fullSynced.Load() }
