package netpol

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

const fuzzNode = "local"

// gen draws a cluster from fuzz bytes; past the end every draw is 0, so any
// input is a valid (if small) cluster.
type gen struct {
	b []byte
	i int
}

func (g *gen) n(k int) int {
	if g.i >= len(g.b) || k <= 1 {
		g.i++
		return 0
	}
	v := int(g.b[g.i]) % k
	g.i++
	return v
}

func (g *gen) labels() map[string]string {
	m := map[string]string{}
	for range g.n(3) {
		m[[]string{"app", "role"}[g.n(2)]] = []string{"a", "b", "c"}[g.n(3)]
	}
	return m
}

func (g *gen) selector() *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	switch g.n(4) {
	case 0: // empty: everything
	case 1, 2:
		s.MatchLabels = g.labels()
	case 3:
		op := []metav1.LabelSelectorOperator{metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn,
			metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist}[g.n(4)]
		req := metav1.LabelSelectorRequirement{Key: []string{"app", "role", "kubernetes.io/metadata.name"}[g.n(3)], Operator: op}
		if op == metav1.LabelSelectorOpIn || op == metav1.LabelSelectorOpNotIn {
			req.Values = []string{[]string{"a", "b", "c", "x", "y"}[g.n(5)]}
		}
		s.MatchExpressions = []metav1.LabelSelectorRequirement{req}
	}
	return s
}

func (g *gen) v4(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}) }
func (g *gen) v6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0: 0xfd, 15: byte(i)})
}

func (g *gen) prefix(v6 bool) netip.Prefix {
	if v6 {
		bits := []int{0, 120, 124, 126, 127, 128}[g.n(6)]
		return netip.PrefixFrom(g.v6(g.n(16)), bits).Masked()
	}
	bits := []int{0, 8, 28, 29, 30, 31, 32}[g.n(7)]
	return netip.PrefixFrom(g.v4(g.n(16)), bits).Masked()
}

func (g *gen) ipBlock() *networkingv1.IPBlock {
	v6 := g.n(3) == 0
	cidr := g.prefix(v6)
	b := &networkingv1.IPBlock{CIDR: cidr.String()}
	for range g.n(3) {
		if cidr.Bits() == cidr.Addr().BitLen() {
			break
		}
		// A strictly longer prefix inside cidr.
		span := cidr.Addr().BitLen() - cidr.Bits()
		bits := cidr.Bits() + 1 + g.n(min(span, 4))
		if cidr.Bits() == 0 {
			bits = cidr.Addr().BitLen() - g.n(4)
		}
		var a netip.Addr
		if v6 {
			a = g.v6(g.n(16))
		} else {
			a = g.v4(g.n(16))
		}
		e := netip.PrefixFrom(a, bits).Masked()
		if covers(cidr, e) && e.Bits() > cidr.Bits() {
			b.Except = append(b.Except, e.String())
		}
	}
	return b
}

func (g *gen) ports() []networkingv1.NetworkPolicyPort {
	var out []networkingv1.NetworkPolicyPort
	for range g.n(4) {
		var p networkingv1.NetworkPolicyPort
		if k := g.n(4); k > 0 {
			proto := []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}[k-1]
			p.Protocol = &proto
		}
		switch g.n(5) {
		case 0: // every port of the protocol
		case 1, 2:
			port := intstr.FromInt32([]int32{53, 80, 81, 8080}[g.n(4)])
			p.Port = &port
			if g.n(3) == 0 {
				end := port.IntVal + int32(g.n(12))
				p.EndPort = &end
			}
		default:
			port := intstr.FromString([]string{"http", "dns", "alt"}[g.n(3)])
			p.Port = &port
		}
		out = append(out, p)
	}
	return out
}

func (g *gen) peers() []networkingv1.NetworkPolicyPeer {
	var out []networkingv1.NetworkPolicyPeer
	for range g.n(4) {
		var p networkingv1.NetworkPolicyPeer
		switch g.n(4) {
		case 0:
			p.PodSelector = g.selector()
		case 1:
			p.NamespaceSelector = g.selector()
		case 2:
			p.PodSelector, p.NamespaceSelector = g.selector(), g.selector()
		case 3:
			p.IPBlock = g.ipBlock()
		}
		out = append(out, p)
	}
	return out
}

var fuzzNamespaces = []string{"x", "y", "z"}

var fuzzContainerPorts = []corev1.ContainerPort{
	{Name: "http", ContainerPort: 80},
	{Name: "http", ContainerPort: 81},
	{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP},
	{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolTCP},
	{Name: "alt", ContainerPort: 8085, Protocol: corev1.ProtocolSCTP},
}

func genInputs(data []byte) Inputs {
	g := &gen{b: data}
	in := Inputs{NodeName: fuzzNode, IDs: NewIDs()}
	for _, n := range fuzzNamespaces {
		in.Namespaces = append(in.Namespaces, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: g.labels()}})
	}
	for i := range 1 + g.n(8) {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: fuzzNamespaces[g.n(3)], Name: fmt.Sprintf("p%d", i),
				UID: types.UID(fmt.Sprintf("uid-%d", i)), Labels: g.labels()},
			Spec:   corev1.PodSpec{NodeName: []string{fuzzNode, fuzzNode, "other"}[g.n(3)], HostNetwork: g.n(8) == 0},
			Status: corev1.PodStatus{Phase: corev1.PodRunning},
		}
		if g.n(10) == 0 {
			pod.Status.Phase = corev1.PodSucceeded
		}
		// Addresses from a small pool so pods collide with each other and
		// with ipBlocks.
		if g.n(6) > 0 {
			pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: g.v4(g.n(16)).String()})
		}
		if g.n(3) == 0 {
			pod.Status.PodIPs = append(pod.Status.PodIPs, corev1.PodIP{IP: g.v6(g.n(16)).String()})
		}
		var c corev1.Container
		seen := map[string]bool{}
		for range g.n(4) {
			cp := fuzzContainerPorts[g.n(len(fuzzContainerPorts))]
			if !seen[cp.Name] { // names are unique within a pod
				seen[cp.Name] = true
				c.Ports = append(c.Ports, cp)
			}
		}
		pod.Spec.Containers = []corev1.Container{c}
		in.Pods = append(in.Pods, pod)
	}
	for i := range g.n(5) {
		p := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: fuzzNamespaces[g.n(3)], Name: fmt.Sprintf("np%d", i)}}
		p.Spec.PodSelector = *g.selector()
		switch g.n(4) {
		case 1:
			p.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		case 2:
			p.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		case 3:
			p.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
		}
		for range g.n(4) {
			p.Spec.Ingress = append(p.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: g.peers(), Ports: g.ports()})
		}
		for range g.n(4) {
			p.Spec.Egress = append(p.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: g.peers(), Ports: g.ports()})
		}
		in.Policies = append(in.Policies, p)
	}
	return in
}

var probePorts = []uint16{0, 53, 79, 80, 81, 82, 90, 8080, 8085, 8091}
var probeProtos = []dp.Proto{dp.TCP, dp.UDP, dp.SCTP, 1}

func probeAddrs() []netip.Addr {
	g := &gen{}
	var out []netip.Addr
	for i := range 16 {
		out = append(out, g.v4(i), g.v6(i))
	}
	return append(out, netip.MustParseAddr("10.0.1.1"), netip.MustParseAddr("192.168.1.1"),
		netip.MustParseAddr("fd00::1:1"), netip.MustParseAddr("2001:db8::1"))
}

// checkCompiled holds one compilation to the invariants and the reference
// evaluator; rng picks the probes (nil: all of them).
func checkCompiled(t *testing.T, in Inputs, out map[uint32]dp.EndpointPolicy, problems []Problem, rng *rand.Rand) {
	t.Helper()
	tooMany := map[string]bool{}
	for _, p := range problems {
		if p.Reason == ReasonTooManyRules {
			tooMany[p.Namespace+"/"+p.Pod] = true
		}
	}
	byID := map[uint32]*corev1.Pod{}
	for _, pod := range in.Pods {
		if !IsLocalEndpoint(pod, in.NodeName) {
			continue
		}
		id := in.IDs.Endpoint(pod.UID)
		byID[id] = pod
		if _, ok := out[id]; !ok {
			t.Fatalf("local pod %s/%s has no endpoint policy", pod.Namespace, pod.Name)
		}
	}
	policyByID := map[uint32]*networkingv1.NetworkPolicy{}
	for _, p := range in.Policies {
		policyByID[in.IDs.Policy(p.Namespace, p.Name)] = p
	}
	addrs := probeAddrs()
	for id, ep := range out {
		pod := byID[id]
		if pod == nil {
			t.Fatalf("endpoint %d is not a local pod", id)
		}
		if ep.ID != id {
			t.Fatalf("endpoint keyed %d has ID %d", id, ep.ID)
		}
		var lowest uint32
		for pid, p := range policyByID {
			if (refPolicyApplies(p, pod, dp.Ingress) || refPolicyApplies(p, pod, dp.Egress)) && (lowest == 0 || pid < lowest) {
				lowest = pid
			}
		}
		if ep.DefaultDenyPolicy != lowest {
			t.Fatalf("%s: DefaultDenyPolicy %d, want %d", pod.Name, ep.DefaultDenyPolicy, lowest)
		}
		for _, d := range []struct {
			dir      dp.Direction
			enforced bool
			entries  []dp.PeerEntry
		}{{dp.Ingress, ep.IngressEnforced, ep.Ingress}, {dp.Egress, ep.EgressEnforced, ep.Egress}} {
			if !d.enforced && len(d.entries) > 0 {
				t.Fatalf("%s dir %d: entries for a direction not enforced", pod.Name, d.dir)
			}
			seen := map[netip.Prefix]bool{}
			for _, e := range d.entries {
				if seen[e.Prefix] {
					t.Fatalf("%s dir %d: prefix %s twice", pod.Name, d.dir, e.Prefix)
				}
				seen[e.Prefix] = true
				if e.Prefix != e.Prefix.Masked() {
					t.Fatalf("%s: prefix %s not masked", pod.Name, e.Prefix)
				}
				if len(e.Rules) > dp.MaxRulesPerPrefix {
					t.Fatalf("%s: %s has %d rules", pod.Name, e.Prefix, len(e.Rules))
				}
				for _, r := range e.Rules {
					p := policyByID[r.PolicyID]
					if r.PolicyID == 0 || p == nil || !refPolicyApplies(p, pod, d.dir) {
						t.Fatalf("%s dir %d: rule %+v names policy %d which does not select it", pod.Name, d.dir, r, r.PolicyID)
					}
					n := len(p.Spec.Ingress)
					if d.dir == dp.Egress {
						n = len(p.Spec.Egress)
					}
					if int(r.Rule) >= n {
						t.Fatalf("%s: rule index %d out of range for policy %d", pod.Name, r.Rule, r.PolicyID)
					}
				}
			}
		}
		for _, dir := range []dp.Direction{dp.Ingress, dp.Egress} {
			for _, a := range addrs {
				for _, proto := range probeProtos {
					for _, port := range probePorts {
						if rng != nil && rng.IntN(8) != 0 {
							continue
						}
						pr := probe{dir, a, proto, port}
						if proto == 1 {
							pr.port = 0
						}
						_, want := refAllowed(in, pod, pr)
						got := lpmAllowed(ep, pr)
						if tooMany[pod.Namespace+"/"+pod.Name] {
							// Failed closed: never allows what the
							// policies do not (it may deny more).
							if got && !want {
								t.Fatalf("%s/%s %+v: failed-closed endpoint allows what the policies deny\nendpoint: %+v", pod.Namespace, pod.Name, pr, ep)
							}
							continue
						}
						if got != want {
							t.Fatalf("%s/%s %+v: compiled %v, reference %v\nendpoint: %+v", pod.Namespace, pod.Name, pr, got, want, ep)
						}
					}
				}
			}
		}
	}
}

func FuzzCompile(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"))
	f.Fuzz(func(t *testing.T, data []byte) {
		in := genInputs(data)
		out, problems := Compile(in)
		for _, p := range problems {
			if p.Reason != ReasonTooManyRules {
				t.Fatalf("valid input gave problem %s", p)
			}
		}
		checkCompiled(t, in, out, problems, rand.New(rand.NewPCG(uint64(len(data)), 1)))

		// Input order and a fresh allocator must not change the result.
		again := in
		again.Policies = reversed(in.Policies)
		again.Pods = reversed(in.Pods)
		again.Namespaces = reversed(in.Namespaces)
		again.IDs = NewIDs()
		for _, pod := range in.Pods { // same endpoint IDs
			if IsLocalEndpoint(pod, in.NodeName) {
				again.IDs.Endpoint(pod.UID)
			}
		}
		out2, _ := Compile(again)
		if !reflect.DeepEqual(out, out2) {
			t.Fatalf("compilation depends on input order:\n%+v\n%+v", out, out2)
		}
	})
}

func reversed[T any](s []T) []T {
	out := make([]T, len(s))
	for i, v := range s {
		out[len(s)-1-i] = v
	}
	return out
}
