package l7

import (
	"cmp"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// accepted splits policies into the valid ones (the only ones that reach
// Envoy) and the validation message of each invalid one, keyed namespace/name.
func accepted(policies []*v1alpha1.L7Policy) (ok []*v1alpha1.L7Policy, invalid map[string]string) {
	invalid = map[string]string{}
	for _, p := range policies {
		if errs := v1alpha1.ValidateL7Policy(p); len(errs) > 0 {
			invalid[p.Namespace+"/"+p.Name] = errs.ToAggregate().Error()
			continue
		}
		ok = append(ok, p)
	}
	slices.SortFunc(ok, func(a, b *v1alpha1.L7Policy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return ok, invalid
}

// xdsPod is what the builder needs of a pod. Pods without IPs and terminal
// pods are left out: their IPs may already belong to another pod.
func xdsPod(p *corev1.Pod) (xds.Pod, bool) {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return xds.Pod{}, false
	}
	out := xds.Pod{Namespace: p.Namespace, Name: p.Name, Node: p.Spec.NodeName,
		Labels: p.Labels, HostNetwork: p.Spec.HostNetwork}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	if len(out.IPs) == 0 {
		if a, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	return out, len(out.IPs) > 0
}

// input is the builder's view of the cluster.
func input(policies []*v1alpha1.L7Policy, pods []*corev1.Pod, namespaces []*corev1.Namespace) xds.Input {
	in := xds.Input{Policies: policies, Namespaces: map[string]map[string]string{}}
	for _, p := range pods {
		if xp, ok := xdsPod(p); ok {
			in.Pods = append(in.Pods, xp)
		}
	}
	slices.SortFunc(in.Pods, func(a, b xds.Pod) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, ns := range namespaces {
		in.Namespaces[ns.Name] = ns.Labels
	}
	return in
}

// nodeListener is where Envoy listens on node: its first IPv4
// InternalIP (pods reach it through their veth, host processes locally).
func nodeListener(node *corev1.Node, port uint16) (netip.AddrPort, bool) {
	for _, t := range []corev1.NodeAddressType{corev1.NodeInternalIP, corev1.NodeExternalIP} {
		for _, a := range node.Status.Addresses {
			if a.Type != t {
				continue
			}
			if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Unmap().Is4() {
				return netip.AddrPortFrom(ip.Unmap(), port), true
			}
		}
	}
	return netip.AddrPort{}, false
}
