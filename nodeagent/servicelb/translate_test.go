package servicelb

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// --- builders shared by the tests of this package ---------------------

type svcOpt func(*v1.Service)

func service(ns, name string, opts ...svcOpt) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{
			Type:       v1.ServiceTypeClusterIP,
			ClusterIP:  "10.96.0.10",
			ClusterIPs: []string{"10.96.0.10"},
			Ports:      []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func clusterIPs(ips ...string) svcOpt {
	return func(s *v1.Service) { s.Spec.ClusterIP, s.Spec.ClusterIPs = ips[0], ips }
}

func ports(ps ...v1.ServicePort) svcOpt { return func(s *v1.Service) { s.Spec.Ports = ps } }

func svcType(t v1.ServiceType) svcOpt { return func(s *v1.Service) { s.Spec.Type = t } }

func port(name string, proto v1.Protocol, p int32, target intstr.IntOrString, nodePort int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: p, TargetPort: target, NodePort: nodePort}
}

type epOpt func(*discovery.Endpoint)

func ep(ip string, opts ...epOpt) discovery.Endpoint {
	e := discovery.Endpoint{Addresses: []string{ip}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)},
		NodeName: ptr.To("node-a")}
	for _, o := range opts {
		o(&e)
	}
	return e
}

func onNode(n string) epOpt { return func(e *discovery.Endpoint) { e.NodeName = ptr.To(n) } }

func terminating(serving bool) epOpt {
	return func(e *discovery.Endpoint) {
		e.Conditions = discovery.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(serving), Terminating: ptr.To(true)}
	}
}

func notReady() epOpt {
	return func(e *discovery.Endpoint) {
		e.Conditions = discovery.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(false), Terminating: ptr.To(false)}
	}
}

func slicePorts(ps ...any) []discovery.EndpointPort {
	var out []discovery.EndpointPort
	for i := 0; i < len(ps); i += 3 {
		out = append(out, discovery.EndpointPort{Name: ptr.To(ps[i].(string)), Protocol: ptr.To(ps[i+1].(v1.Protocol)), Port: ptr.To(int32(ps[i+2].(int)))})
	}
	return out
}

func epSlice(ns, svc, name string, at discovery.AddressType, ps []discovery.EndpointPort, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discovery.LabelServiceName: svc}},
		AddressType: at,
		Ports:       ps,
		Endpoints:   eps,
	}
}

func fe(ip string, port uint16, proto socklb.Proto) socklb.Frontend {
	return socklb.Frontend{IP: netip.MustParseAddr(ip), Port: port, Proto: proto}
}

func be(ip string, port uint16) socklb.Backend {
	return socklb.Backend{IP: netip.MustParseAddr(ip), Port: port}
}

func key(ns, name, portName string, proto socklb.Proto, v6 bool, scope Scope) PortKey {
	return PortKey{Service: types.NamespacedName{Namespace: ns, Name: name}, PortName: portName, Proto: proto, IPv6: v6, Scope: scope}
}

func lbsvc(fes []socklb.Frontend, bes []socklb.Backend, aff time.Duration) socklb.Service {
	return normalize(socklb.Service{Frontends: fes, Backends: bes, AffinityTimeout: aff})
}

func fes(f ...socklb.Frontend) []socklb.Frontend { return f }
func bes(b ...socklb.Backend) []socklb.Backend   { return b }

var (
	tcp  = socklb.TCP
	udp  = socklb.UDP
	sctp = socklb.SCTP
	v4   = discovery.AddressTypeIPv4
	v6   = discovery.AddressTypeIPv6
	node = NodeInfo{Name: "node-a", IPs: []netip.Addr{netip.MustParseAddr("172.18.0.2"), netip.MustParseAddr("fc00::2")}}
)

// ---------------------------------------------------------------------

func TestTranslate(t *testing.T) {
	httpSlice := slicePorts("http", v1.ProtocolTCP, 8080)
	tests := []struct {
		name   string
		svc    *v1.Service
		slices []*discovery.EndpointSlice
		want   map[PortKey]socklb.Service
	}{
		{
			name:   "clusterIP TCP with two ready endpoints",
			svc:    service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice, ep("10.244.0.5"), ep("10.244.0.4"))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080), be("10.244.0.5", 8080)), 0),
			},
		},
		{
			name: "several ports, TCP UDP SCTP",
			svc: service("ns", "dns", ports(
				port("dns", v1.ProtocolUDP, 53, intstr.FromInt32(5353), 0),
				port("dns-tcp", v1.ProtocolTCP, 53, intstr.FromInt32(5353), 0),
				port("sig", v1.ProtocolSCTP, 3868, intstr.FromInt32(3868), 0))),
			slices: []*discovery.EndpointSlice{epSlice("ns", "dns", "dns-1", v4,
				slicePorts("dns", v1.ProtocolUDP, 5353, "dns-tcp", v1.ProtocolTCP, 5353, "sig", v1.ProtocolSCTP, 3868), ep("10.244.0.7"))},
			want: map[PortKey]socklb.Service{
				key("ns", "dns", "dns", udp, false, ScopeAll):     lbsvc(fes(fe("10.96.0.10", 53, udp)), bes(be("10.244.0.7", 5353)), 0),
				key("ns", "dns", "dns-tcp", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 53, tcp)), bes(be("10.244.0.7", 5353)), 0),
				key("ns", "dns", "sig", sctp, false, ScopeAll):    lbsvc(fes(fe("10.96.0.10", 3868, sctp)), bes(be("10.244.0.7", 3868)), 0),
			},
		},
		{
			name: "named targetPort resolved per slice",
			svc:  service("ns", "web", ports(port("http", v1.ProtocolTCP, 80, intstr.FromString("web"), 0))),
			slices: []*discovery.EndpointSlice{
				epSlice("ns", "web", "web-a", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.0.4")),
				epSlice("ns", "web", "web-b", v4, slicePorts("http", v1.ProtocolTCP, 9090), ep("10.244.0.5")),
			},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080), be("10.244.0.5", 9090)), 0),
			},
		},
		{
			name: "slice port of another name or protocol is ignored",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{
				epSlice("ns", "web", "web-a", v4, slicePorts("metrics", v1.ProtocolTCP, 9100), ep("10.244.0.4")),
				epSlice("ns", "web", "web-b", v4, slicePorts("http", v1.ProtocolUDP, 8080), ep("10.244.0.5")),
			},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 0),
			},
		},
		{
			name: "dual-stack: one datapath service per family",
			svc:  service("ns", "web", clusterIPs("10.96.0.10", "fd00:10:96::a")),
			slices: []*discovery.EndpointSlice{
				epSlice("ns", "web", "web-v4", v4, httpSlice, ep("10.244.0.4")),
				epSlice("ns", "web", "web-v6", v6, httpSlice, ep("fd00:10:244::4")),
			},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
				key("ns", "web", "http", tcp, true, ScopeAll):  lbsvc(fes(fe("fd00:10:96::a", 80, tcp)), bes(be("fd00:10:244::4", 8080)), 0),
			},
		},
		{
			name:   "IPv6 single-stack",
			svc:    service("ns", "web", clusterIPs("fd00:10:96::a")),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-v6", v6, httpSlice, ep("fd00:10:244::4"))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, true, ScopeAll): lbsvc(fes(fe("fd00:10:96::a", 80, tcp)), bes(be("fd00:10:244::4", 8080)), 0),
			},
		},
		{
			name: "NodePort on every InternalIP of its family, plus ExternalIPs",
			svc: service("ns", "web", svcType(v1.ServiceTypeNodePort), ports(port("http", v1.ProtocolTCP, 80, intstr.FromInt32(8080), 30080)),
				func(s *v1.Service) { s.Spec.ExternalIPs = []string{"192.0.2.10", "2001:db8::10"} }),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice, ep("10.244.0.4"))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(
					fes(fe("10.96.0.10", 80, tcp), fe("172.18.0.2", 30080, tcp), fe("192.0.2.10", 80, tcp)),
					bes(be("10.244.0.4", 8080)), 0),
			},
		},
		{
			name: "LoadBalancer ingress IPs, except ipMode Proxy",
			svc: service("ns", "web", svcType(v1.ServiceTypeLoadBalancer), ports(port("http", v1.ProtocolTCP, 80, intstr.FromInt32(8080), 30080)),
				func(s *v1.Service) {
					s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "198.51.100.1"}, {IP: "198.51.100.2", IPMode: ptr.To(v1.LoadBalancerIPModeProxy)}}
				}),
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(
					fes(fe("10.96.0.10", 80, tcp), fe("172.18.0.2", 30080, tcp), fe("198.51.100.1", 80, tcp)), nil, 0),
			},
		},
		{
			name: "nodePort on a ClusterIP Service is not a frontend",
			svc:  service("ns", "web", ports(port("http", v1.ProtocolTCP, 80, intstr.FromInt32(8080), 30080))),
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 0),
			},
		},
		{
			name:   "headless untouched",
			svc:    service("ns", "db", clusterIPs("None")),
			slices: []*discovery.EndpointSlice{epSlice("ns", "db", "db-1", v4, httpSlice, ep("10.244.0.4"))},
			want:   nil,
		},
		{
			name: "ExternalName untouched",
			svc: service("ns", "ext", svcType(v1.ServiceTypeExternalName), clusterIPs(""),
				func(s *v1.Service) { s.Spec.ExternalName = "example.com" }),
			want: nil,
		},
		{
			name: "ready endpoints win over terminating ones",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.0.4"), ep("10.244.0.5", terminating(true)), ep("10.244.0.6", notReady()))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
			},
		},
		{
			name: "no ready endpoint: serving and terminating ones",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.0.5", terminating(true)), ep("10.244.0.6", terminating(false)), ep("10.244.0.7", notReady()))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.5", 8080)), 0),
			},
		},
		{
			name: "nothing usable: empty backend list (ECONNREFUSED)",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.0.6", terminating(false)), ep("10.244.0.7", notReady()))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 0),
			},
		},
		{
			name: "unset conditions mean ready",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				func() discovery.Endpoint {
					e := ep("10.244.0.4")
					e.Conditions = discovery.EndpointConditions{}
					return e
				}())},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
			},
		},
		{
			name: "endpoint listed in two slices counts once",
			svc:  service("ns", "web"),
			slices: []*discovery.EndpointSlice{
				epSlice("ns", "web", "web-1", v4, httpSlice, ep("10.244.0.4")),
				epSlice("ns", "web", "web-2", v4, httpSlice, ep("10.244.0.4")),
			},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
			},
		},
		{
			name: "sessionAffinity ClientIP with default timeout",
			svc:  service("ns", "web", func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }),
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 10800*time.Second),
			},
		},
		{
			name: "sessionAffinity ClientIP with timeoutSeconds",
			svc: service("ns", "web", func(s *v1.Service) {
				s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
				s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr.To(int32(60))}}
			}),
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, time.Minute),
			},
		},
		{
			name: "internalTrafficPolicy Local: local endpoints for the ClusterIP only",
			svc: service("ns", "web", svcType(v1.ServiceTypeNodePort), ports(port("http", v1.ProtocolTCP, 80, intstr.FromInt32(8080), 30080)),
				func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptr.To(v1.ServiceInternalTrafficPolicyLocal) }),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.0.4"), ep("10.244.1.4", onNode("node-b")))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeInternal): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
				key("ns", "web", "http", tcp, false, ScopeExternal): lbsvc(fes(fe("172.18.0.2", 30080, tcp)), bes(be("10.244.0.4", 8080), be("10.244.1.4", 8080)), 0),
			},
		},
		{
			name: "internalTrafficPolicy Local: terminating fallback among local endpoints, remote ready ones ignored",
			svc:  service("ns", "web", func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptr.To(v1.ServiceInternalTrafficPolicyLocal) }),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.0.4", terminating(true)), ep("10.244.1.4", onNode("node-b")))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeInternal): lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.4", 8080)), 0),
			},
		},
		{
			name: "internalTrafficPolicy Local without local endpoints: none",
			svc:  service("ns", "web", func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptr.To(v1.ServiceInternalTrafficPolicyLocal) }),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, httpSlice,
				ep("10.244.1.4", onNode("node-b")))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeInternal): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 0),
			},
		},
		{
			name:   "FQDN slices and wrong-family addresses are ignored",
			svc:    service("ns", "web"),
			slices: []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", discovery.AddressTypeFQDN, httpSlice, ep("example.com")), epSlice("ns", "web", "web-2", v4, httpSlice, ep("fd00::1"))},
			want: map[PortKey]socklb.Service{
				key("ns", "web", "http", tcp, false, ScopeAll): lbsvc(fes(fe("10.96.0.10", 80, tcp)), nil, 0),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Translate(tt.svc, tt.slices, node)
			if len(got) == 0 && len(tt.want) == 0 {
				return
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Translate =\n%s\nwant\n%s", dump(got), dump(tt.want))
			}
		})
	}
}

func dump(m map[PortKey]socklb.Service) string {
	var b strings.Builder
	for k, s := range m {
		fmt.Fprintf(&b, "  %s: fe=%v be=%v aff=%s\n", k, s.Frontends, s.Backends, s.AffinityTimeout)
	}
	return b.String()
}

func TestNodeInfoFromNode(t *testing.T) {
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}, Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
		{Type: v1.NodeHostName, Address: "node-a"},
		{Type: v1.NodeInternalIP, Address: "fc00::2"},
		{Type: v1.NodeInternalIP, Address: "172.18.0.2"},
		{Type: v1.NodeExternalIP, Address: "203.0.113.1"},
	}}}
	if got := NodeInfoFromNode(n); !reflect.DeepEqual(got, node) {
		t.Errorf("NodeInfoFromNode = %+v, want %+v", got, node)
	}
}

func TestEqualIgnoresOrder(t *testing.T) {
	a := socklb.Service{ID: 1, Frontends: fes(fe("10.0.0.1", 80, tcp), fe("10.0.0.2", 80, tcp)), Backends: bes(be("10.1.0.1", 1), be("10.1.0.2", 1))}
	b := socklb.Service{ID: 1, Frontends: fes(fe("10.0.0.2", 80, tcp), fe("10.0.0.1", 80, tcp)), Backends: bes(be("10.1.0.2", 1), be("10.1.0.1", 1))}
	if !Equal(a, b) {
		t.Error("Equal is order sensitive")
	}
	b.AffinityTimeout = time.Second
	if Equal(a, b) {
		t.Error("Equal ignores affinity")
	}
}

func intstrFrom(p int32) intstr.IntOrString { return intstr.FromInt32(p) }

// TestNodePortOnOtherNodes: a NodePort is a frontend at every node's
// InternalIP, the other nodes' too, so a connect from this node to another
// node's address and NodePort needs no kube-proxy there.
func TestNodePortOnOtherNodes(t *testing.T) {
	mk := func(name string, ips ...string) *v1.Node {
		n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
		for _, ip := range ips {
			n.Status.Addresses = append(n.Status.Addresses, v1.NodeAddress{Type: v1.NodeInternalIP, Address: ip})
		}
		return n
	}
	ni := NodeInfoFromNodes("node-a", []*v1.Node{mk("node-b", "172.18.0.3"), mk("node-a", "172.18.0.2"), mk("node-c", "172.18.0.4", "172.18.0.3")})
	want := NodeInfo{Name: "node-a", IPs: []netip.Addr{netip.MustParseAddr("172.18.0.2")},
		OtherNodeIPs: []netip.Addr{netip.MustParseAddr("172.18.0.3"), netip.MustParseAddr("172.18.0.4")}}
	if !reflect.DeepEqual(ni, want) {
		t.Fatalf("NodeInfoFromNodes = %+v, want %+v", ni, want)
	}
	svc := service("ns", "web", svcType(v1.ServiceTypeNodePort), ports(port("http", v1.ProtocolTCP, 80, intstr.FromInt32(8080), 30080)))
	sls := []*discovery.EndpointSlice{epSlice("ns", "web", "web-1", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.1.4"))}
	got := Translate(svc, sls, ni)
	k := key("ns", "web", "http", tcp, false, ScopeAll)
	wantSvc := lbsvc(fes(fe("10.96.0.10", 80, tcp), fe("172.18.0.2", 30080, tcp), fe("172.18.0.3", 30080, tcp), fe("172.18.0.4", 30080, tcp)),
		bes(be("10.244.1.4", 8080)), 0)
	if len(got) != 1 || !Equal(got[k], wantSvc) {
		t.Errorf("Translate:\n%s\nwant %s: fe=%v", dump(got), k, wantSvc.Frontends)
	}
}
