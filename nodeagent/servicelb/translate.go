// Package servicelb keeps the socket LB datapath (bpf/socklb) in step with
// the cluster's Services and EndpointSlices.
//
// The structure follows kube-proxy: informer event handlers only record
// changes in a change tracker and ask for a sync; one bounded-frequency runner
// translates the accumulated delta into socklb.Service values and applies
// only those (translate.go holds the pure translation, tracker.go the change
// tracker, runner.go the runner, sync.go the sync itself).
package servicelb

import (
	"cmp"
	"net/netip"
	"slices"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// DefaultAffinityTimeout is Kubernetes' default
// sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
const DefaultAffinityTimeout = 10800 * time.Second

// Scope says which traffic a datapath service carries. With
// internalTrafficPolicy: Local, ClusterIP traffic goes to node-local
// endpoints only while NodePort/ExternalIP traffic still uses every endpoint
// (kube-proxy's rule), so such a port becomes two datapath services.
type Scope uint8

const (
	// ScopeAll carries every frontend of the port (the usual case).
	ScopeAll Scope = iota
	// ScopeInternal carries the ClusterIP frontends of an iTP=Local port.
	ScopeInternal
	// ScopeExternal carries the NodePort/ExternalIP/LoadBalancer frontends
	// of an iTP=Local port.
	ScopeExternal
)

// PortKey names one datapath service: one port of one Service in one IP
// family (and scope). The agent allocates one ID per PortKey.
type PortKey struct {
	Service  types.NamespacedName
	PortName string
	Proto    socklb.Proto
	IPv6     bool
	Scope    Scope
}

func (k PortKey) String() string {
	fam := "v4"
	if k.IPv6 {
		fam = "v6"
	}
	s := k.Service.String() + ":" + k.PortName + "/" + protoName(k.Proto) + "/" + fam
	switch k.Scope {
	case ScopeInternal:
		s += "/internal"
	case ScopeExternal:
		s += "/external"
	}
	return s
}

func protoName(p socklb.Proto) string {
	switch p {
	case socklb.TCP:
		return "tcp"
	case socklb.UDP:
		return "udp"
	case socklb.SCTP:
		return "sctp"
	}
	return "unknown"
}

// NodeInfo is what translation needs to know about the agent's node.
type NodeInfo struct {
	Name string
	// IPs are the node's InternalIP addresses (NodePort frontends).
	IPs []netip.Addr
	// OtherNodeIPs are the other nodes' InternalIP addresses: a connect to
	// any node's address and NodePort is translated here, at the socket,
	// as kube-proxy would DNAT it on arrival at that node (a NodePort
	// reached from inside the cluster works without kube-proxy).
	OtherNodeIPs []netip.Addr
}

// NodeInfoFromNode extracts the node's name and InternalIP addresses.
func NodeInfoFromNode(n *v1.Node) NodeInfo {
	if n == nil {
		return NodeInfo{}
	}
	ni := NodeInfo{Name: n.Name}
	for _, a := range n.Status.Addresses {
		if a.Type != v1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			ni.IPs = append(ni.IPs, ip.Unmap())
		}
	}
	slices.SortFunc(ni.IPs, netip.Addr.Compare)
	ni.IPs = slices.Compact(ni.IPs)
	return ni
}

// NodeInfoFromNodes is NodeInfoFromNode of the node named self, with the
// InternalIPs of every other node of nodes.
func NodeInfoFromNodes(self string, nodes []*v1.Node) NodeInfo {
	ni := NodeInfo{Name: self}
	for _, n := range nodes {
		one := NodeInfoFromNode(n)
		if n.Name == self {
			ni.IPs = one.IPs
			continue
		}
		ni.OtherNodeIPs = append(ni.OtherNodeIPs, one.IPs...)
	}
	slices.SortFunc(ni.OtherNodeIPs, netip.Addr.Compare)
	ni.OtherNodeIPs = slices.Compact(ni.OtherNodeIPs)
	return ni
}

// Programmable reports whether the socket LB handles svc at all: headless
// and ExternalName Services are left to DNS.
func Programmable(svc *v1.Service) bool {
	if svc == nil || svc.Spec.Type == v1.ServiceTypeExternalName {
		return false
	}
	if svc.Spec.ClusterIP == v1.ClusterIPNone || svc.Spec.ClusterIP == "" {
		return false
	}
	return true
}

// Translate turns one Service and its EndpointSlices into the datapath
// services for this node, keyed by PortKey, without IDs. It is pure: the
// same inputs always give the same, sorted output.
func Translate(svc *v1.Service, epSlices []*discovery.EndpointSlice, node NodeInfo) map[PortKey]socklb.Service {
	if !Programmable(svc) {
		return nil
	}
	name := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	var affinity time.Duration
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		affinity = DefaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	localOnly := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal

	clusterIPs := parseIPs(svc.Spec.ClusterIPs)
	if len(clusterIPs) == 0 {
		clusterIPs = parseIPs([]string{svc.Spec.ClusterIP})
	}
	externalIPs := parseIPs(svc.Spec.ExternalIPs)
	var lbIPs []netip.Addr
	if svc.Spec.Type == v1.ServiceTypeLoadBalancer {
		for _, ing := range svc.Status.LoadBalancer.Ingress {
			// ipMode Proxy means the load balancer proxies and expects the
			// traffic to really leave the node (kube-proxy skips it too).
			if ing.IPMode != nil && *ing.IPMode == v1.LoadBalancerIPModeProxy {
				continue
			}
			lbIPs = append(lbIPs, parseIPs([]string{ing.IP})...)
		}
	}
	nodePorts := svc.Spec.Type == v1.ServiceTypeNodePort || svc.Spec.Type == v1.ServiceTypeLoadBalancer

	out := make(map[PortKey]socklb.Service)
	for _, sp := range svc.Spec.Ports {
		proto, ok := protoOf(sp.Protocol)
		if !ok {
			continue
		}
		for _, v6 := range []bool{false, true} {
			var internal, external []socklb.Frontend
			fe := func(ips []netip.Addr, port int32) []socklb.Frontend {
				var fs []socklb.Frontend
				for _, ip := range ips {
					if ip.Is6() == v6 && port > 0 && port <= 65535 {
						fs = append(fs, socklb.Frontend{IP: ip, Port: uint16(port), Proto: proto})
					}
				}
				return fs
			}
			internal = fe(clusterIPs, sp.Port)
			if len(internal) == 0 {
				// The Service has no ClusterIP in this family, so it is
				// not dual-stack here: nothing to program for v6 (or v4).
				continue
			}
			if nodePorts && sp.NodePort != 0 {
				external = append(external, fe(node.IPs, sp.NodePort)...)
				external = append(external, fe(node.OtherNodeIPs, sp.NodePort)...)
			}
			external = append(external, fe(externalIPs, sp.Port)...)
			external = append(external, fe(lbIPs, sp.Port)...)

			base := PortKey{Service: name, PortName: sp.Name, Proto: proto, IPv6: v6}
			all := backendsFor(epSlices, sp, v6, "")
			if !localOnly {
				k := base
				out[k] = normalize(socklb.Service{Frontends: append(internal, external...), Backends: all, AffinityTimeout: affinity})
				continue
			}
			k := base
			k.Scope = ScopeInternal
			out[k] = normalize(socklb.Service{Frontends: internal, Backends: backendsFor(epSlices, sp, v6, node.Name), AffinityTimeout: affinity})
			if len(external) > 0 {
				k.Scope = ScopeExternal
				out[k] = normalize(socklb.Service{Frontends: external, Backends: all, AffinityTimeout: affinity})
			}
		}
	}
	return out
}

func protoOf(p v1.Protocol) (socklb.Proto, bool) {
	switch p {
	case v1.ProtocolTCP, "":
		return socklb.TCP, true
	case v1.ProtocolUDP:
		return socklb.UDP, true
	case v1.ProtocolSCTP:
		return socklb.SCTP, true
	}
	return 0, false
}

func parseIPs(ss []string) []netip.Addr {
	var ips []netip.Addr
	for _, s := range ss {
		if ip, err := netip.ParseAddr(s); err == nil {
			ips = append(ips, ip.Unmap())
		}
	}
	return ips
}

// endpoint conditions, with the API's defaults for unset fields: nil ready
// and serving mean true, nil terminating means false.
func isReady(c discovery.EndpointConditions) bool { return c.Ready == nil || *c.Ready }
func isServing(c discovery.EndpointConditions) bool {
	if c.Serving == nil {
		return isReady(c)
	}
	return *c.Serving
}
func isTerminating(c discovery.EndpointConditions) bool {
	return c.Terminating != nil && *c.Terminating
}

// backendsFor picks the endpoints of one service port in one family the way
// kube-proxy does: ready endpoints; when there are none, those that are
// serving and terminating; else none. A non-empty localNode restricts the
// choice to endpoints on that node (internalTrafficPolicy: Local) before the
// rule is applied.
//
// The port comes from each slice's port of the service port's name: for a
// named targetPort the EndpointSlice controller resolves the name per pod and
// groups pods with the same number into one slice, so different slices may
// carry different numbers.
func backendsFor(epSlices []*discovery.EndpointSlice, sp v1.ServicePort, v6 bool, localNode string) []socklb.Backend {
	want := discovery.AddressTypeIPv4
	if v6 {
		want = discovery.AddressTypeIPv6
	}
	proto := sp.Protocol
	if proto == "" {
		proto = v1.ProtocolTCP
	}
	var ready, fallback []socklb.Backend
	for _, sl := range epSlices {
		if sl == nil || sl.AddressType != want {
			continue
		}
		port, ok := slicePort(sl, sp.Name, proto)
		if !ok {
			continue
		}
		for _, ep := range sl.Endpoints {
			if localNode != "" && (ep.NodeName == nil || *ep.NodeName != localNode) {
				continue
			}
			if len(ep.Addresses) == 0 {
				continue
			}
			// Only the first address is used: the API says the others are
			// fungible and consumers may ignore them (kube-proxy does).
			ip, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || ip.Unmap().Is6() != v6 {
				continue
			}
			b := socklb.Backend{IP: ip.Unmap(), Port: port}
			switch {
			case isReady(ep.Conditions):
				ready = append(ready, b)
			case isServing(ep.Conditions) && isTerminating(ep.Conditions):
				fallback = append(fallback, b)
			}
		}
	}
	if len(ready) > 0 {
		return ready
	}
	return fallback
}

func slicePort(sl *discovery.EndpointSlice, name string, proto v1.Protocol) (uint16, bool) {
	for _, p := range sl.Ports {
		pn := ""
		if p.Name != nil {
			pn = *p.Name
		}
		pp := v1.ProtocolTCP
		if p.Protocol != nil {
			pp = *p.Protocol
		}
		if pn == name && pp == proto && p.Port != nil && *p.Port > 0 && *p.Port <= 65535 {
			return uint16(*p.Port), true
		}
	}
	return 0, false
}

func compareFrontend(a, b socklb.Frontend) int {
	return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
}

func compareBackend(a, b socklb.Backend) int {
	return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port))
}

// normalize sorts and de-duplicates, so equal services compare equal: an
// endpoint briefly listed in two slices (while the controller moves it) must
// not get two backend slots.
func normalize(s socklb.Service) socklb.Service {
	s.Frontends = slices.Clone(s.Frontends)
	slices.SortFunc(s.Frontends, compareFrontend)
	s.Frontends = slices.Compact(s.Frontends)
	s.Backends = slices.Clone(s.Backends)
	slices.SortFunc(s.Backends, compareBackend)
	s.Backends = slices.Compact(s.Backends)
	if s.Frontends == nil {
		s.Frontends = []socklb.Frontend{}
	}
	if s.Backends == nil {
		s.Backends = []socklb.Backend{}
	}
	return s
}

// Equal reports whether two datapath services program the same thing
// (order of frontends and backends aside).
func Equal(a, b socklb.Service) bool {
	a, b = normalize(a), normalize(b)
	return a.ID == b.ID && a.AffinityTimeout == b.AffinityTimeout &&
		slices.Equal(a.Frontends, b.Frontends) && slices.Equal(a.Backends, b.Backends)
}
