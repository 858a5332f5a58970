package netpol

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// The reference evaluator reads the NetworkPolicy spec directly, one packet
// at a time, with none of the compiler's prefix arithmetic: the fuzz target
// and the table tests hold the compiled entries to it.

type probe struct {
	dir   dp.Direction
	peer  netip.Addr
	proto dp.Proto // 1 (ICMP) stands for a protocol no port rule names
	port  uint16
}

func refSelectorMatches(sel *metav1.LabelSelector, set labels.Set) bool {
	s, err := metav1.LabelSelectorAsSelector(sel)
	return err == nil && s.Matches(set)
}

func refPeerPod(p *corev1.Pod) bool {
	return !p.Spec.HostNetwork && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed
}

func refHasIP(p *corev1.Pod, ip netip.Addr) bool {
	for _, s := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(s.IP); err == nil && a == ip {
			return true
		}
	}
	return false
}

func refNamespaceLabels(in Inputs, name string) (labels.Set, bool) {
	for _, n := range in.Namespaces {
		if n.Name == name {
			s := labels.Set{"kubernetes.io/metadata.name": name}
			for k, v := range n.Labels {
				s[k] = v
			}
			return s, true
		}
	}
	return nil, false
}

// refPolicyApplies: p selects local and enforces dir.
func refPolicyApplies(p *networkingv1.NetworkPolicy, local *corev1.Pod, dir dp.Direction) bool {
	if p.Namespace != local.Namespace || local.Spec.HostNetwork || !refSelectorMatches(&p.Spec.PodSelector, labels.Set(local.Labels)) {
		return false
	}
	want := networkingv1.PolicyTypeIngress
	if dir == dp.Egress {
		want = networkingv1.PolicyTypeEgress
	}
	if len(p.Spec.PolicyTypes) == 0 {
		return want == networkingv1.PolicyTypeIngress || len(p.Spec.Egress) > 0
	}
	for _, t := range p.Spec.PolicyTypes {
		if t == want {
			return true
		}
	}
	return false
}

// refAllowed decides one probe for local pod straight from the spec.
func refAllowed(in Inputs, local *corev1.Pod, pr probe) (enforced, allowed bool) {
	for _, p := range in.Policies {
		if !refPolicyApplies(p, local, pr.dir) {
			continue
		}
		enforced = true
		type rule struct {
			peers []networkingv1.NetworkPolicyPeer
			ports []networkingv1.NetworkPolicyPort
		}
		var rules []rule
		if pr.dir == dp.Ingress {
			for _, r := range p.Spec.Ingress {
				rules = append(rules, rule{r.From, r.Ports})
			}
		} else {
			for _, r := range p.Spec.Egress {
				rules = append(rules, rule{r.To, r.Ports})
			}
		}
		for _, r := range rules {
			// contexts: who the peer address is. nil = an address match
			// that says nothing about ports (CIDR); a pod = that pod.
			var contexts []*corev1.Pod
			peerPodsWithIP := func(match func(*corev1.Pod) bool) {
				for _, q := range in.Pods {
					if refPeerPod(q) && refHasIP(q, pr.peer) && match(q) {
						contexts = append(contexts, q)
					}
				}
			}
			if len(r.peers) == 0 {
				contexts = append(contexts, nil)
				peerPodsWithIP(func(*corev1.Pod) bool { return true })
			}
			for _, peer := range r.peers {
				if peer.IPBlock != nil {
					cidr := netip.MustParsePrefix(peer.IPBlock.CIDR)
					ok := cidr.Contains(pr.peer)
					for _, e := range peer.IPBlock.Except {
						if netip.MustParsePrefix(e).Contains(pr.peer) {
							ok = false
						}
					}
					if ok {
						// The address, and the pods that hold it: an
						// egress named port resolves against them.
						contexts = append(contexts, nil)
						peerPodsWithIP(func(*corev1.Pod) bool { return true })
					}
					continue
				}
				peerPodsWithIP(func(q *corev1.Pod) bool {
					if peer.NamespaceSelector == nil {
						if q.Namespace != p.Namespace {
							return false
						}
					} else {
						nl, ok := refNamespaceLabels(in, q.Namespace)
						if !ok || !refSelectorMatches(peer.NamespaceSelector, nl) {
							return false
						}
					}
					return peer.PodSelector == nil || refSelectorMatches(peer.PodSelector, labels.Set(q.Labels))
				})
			}
			for _, ctx := range contexts {
				if refPortsMatch(r.ports, local, ctx, pr) {
					return true, true
				}
			}
		}
	}
	return enforced, !enforced
}

func refPortsMatch(ports []networkingv1.NetworkPolicyPort, local, peer *corev1.Pod, pr probe) bool {
	if len(ports) == 0 {
		return true
	}
	for _, pp := range ports {
		proto := corev1.ProtocolTCP
		if pp.Protocol != nil {
			proto = *pp.Protocol
		}
		if protocols[proto] != pr.proto {
			continue
		}
		if pp.Port == nil {
			return true
		}
		if pp.Port.Type == intstr.Int {
			hi := pp.Port.IntVal
			if pp.EndPort != nil {
				hi = *pp.EndPort
			}
			if int32(pr.port) >= pp.Port.IntVal && int32(pr.port) <= hi {
				return true
			}
			continue
		}
		owner := local
		if pr.dir == dp.Egress {
			owner = peer
		}
		if owner == nil {
			continue
		}
		for _, c := range owner.Spec.Containers {
			for _, cp := range c.Ports {
				cproto := cp.Protocol
				if cproto == "" {
					cproto = corev1.ProtocolTCP
				}
				if cp.Name == pp.Port.StrVal && cproto == proto && cp.ContainerPort == int32(pr.port) {
					return true
				}
			}
		}
	}
	return false
}

// lpmAllowed decides one probe the way the datapath does: the longest
// matching prefix alone, then any of its rules.
func lpmAllowed(ep dp.EndpointPolicy, pr probe) bool {
	entries, enforced := ep.Ingress, ep.IngressEnforced
	if pr.dir == dp.Egress {
		entries, enforced = ep.Egress, ep.EgressEnforced
	}
	if !enforced {
		return true
	}
	best := -1
	for i, e := range entries {
		if e.Prefix.Contains(pr.peer) && (best < 0 || e.Prefix.Bits() > entries[best].Prefix.Bits()) {
			best = i
		}
	}
	if best < 0 {
		return false
	}
	for _, r := range entries[best].Rules {
		if r.Proto != dp.AnyProto && r.Proto != pr.proto {
			continue
		}
		if (r.PortLo == 0 && r.PortHi == 0) || (pr.port >= r.PortLo && pr.port <= r.PortHi) {
			return true
		}
	}
	return false
}
