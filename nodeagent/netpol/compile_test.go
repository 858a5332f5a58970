package netpol

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

const testNode = "node-1"

// mustPolicy parses YAML; quote 'y': YAML 1.1 reads a bare y as true.
func mustPolicy(t *testing.T, doc string) *networkingv1.NetworkPolicy {
	t.Helper()
	var p networkingv1.NetworkPolicy
	if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
		t.Fatalf("policy yaml: %v\n%s", err, doc)
	}
	if p.Namespace == "" {
		p.Namespace = "x"
	}
	return &p
}

type podSpec struct {
	ns, name, node string
	labels         map[string]string
	ips            []string
	ports          []corev1.ContainerPort
	hostNetwork    bool
	phase          corev1.PodPhase
}

func mkPod(s podSpec) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.ns, Name: s.name, UID: types.UID(s.ns + "-" + s.name), Labels: s.labels},
		Spec:       corev1.PodSpec{NodeName: s.node, HostNetwork: s.hostNetwork, Containers: []corev1.Container{{Name: "c", Ports: s.ports}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if s.phase != "" {
		p.Status.Phase = s.phase
	}
	for _, ip := range s.ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(s.ips) > 0 {
		p.Status.PodIP = s.ips[0]
	}
	return p
}

func mkNamespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

// The cluster of the table tests. x/a is the local pod under test.
func testCluster() ([]*corev1.Pod, []*corev1.Namespace) {
	pods := []*corev1.Pod{
		mkPod(podSpec{ns: "x", name: "a", node: testNode, labels: map[string]string{"app": "a"},
			ips: []string{"10.0.0.10", "fd00::10"}, ports: []corev1.ContainerPort{
				{Name: "http", ContainerPort: 80}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}}),
		mkPod(podSpec{ns: "x", name: "b", node: "node-2", labels: map[string]string{"app": "b"},
			ips: []string{"10.0.0.11"}, ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}),
		mkPod(podSpec{ns: "y", name: "a", node: "node-2", labels: map[string]string{"app": "a"},
			ips: []string{"10.0.0.20"}, ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 81}}}),
		// Never endpoints, never peers.
		mkPod(podSpec{ns: "x", name: "host", node: testNode, labels: map[string]string{"app": "a"},
			ips: []string{"192.0.2.2"}, hostNetwork: true, ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}),
		mkPod(podSpec{ns: "x", name: "done", node: testNode, labels: map[string]string{"app": "a"},
			ips: []string{"10.0.0.99"}, phase: corev1.PodSucceeded}),
		mkPod(podSpec{ns: "x", name: "pending", node: testNode, labels: map[string]string{"app": "a"}}),
	}
	nss := []*corev1.Namespace{mkNamespace("x", map[string]string{"team": "x"}), mkNamespace("y", map[string]string{"team": "y"})}
	return pods, nss
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func rule(proto dp.Proto, lo, hi uint16, policy uint32, idx uint16) dp.PortRule {
	return dp.PortRule{Proto: proto, PortLo: lo, PortHi: hi, PolicyID: policy, Rule: idx}
}

func anyRule(policy uint32, idx uint16) dp.PortRule { return rule(dp.AnyProto, 0, 0, policy, idx) }

func entry(prefix string, rules ...dp.PortRule) dp.PeerEntry {
	return dp.PeerEntry{Prefix: pfx(prefix), Rules: rules}
}

var localIPs = []netip.Addr{netip.MustParseAddr("10.0.0.10"), netip.MustParseAddr("fd00::10")}

// ep is the endpoint policy of x/a (endpoint ID 1).
func ep(ingress, egress bool, defaultDeny uint32, in, eg []dp.PeerEntry) dp.EndpointPolicy {
	return dp.EndpointPolicy{ID: 1, IPs: localIPs, IngressEnforced: ingress, EgressEnforced: egress,
		DefaultDenyPolicy: defaultDeny, Ingress: in, Egress: eg}
}

func TestCompile(t *testing.T) {
	// Policies are named p1, p2, ... so their IDs are 1, 2, ... (IDs are
	// assigned in namespace/name order).
	tests := []struct {
		name     string
		policies []string
		want     dp.EndpointPolicy
		// problems lists the reasons expected, in order.
		problems []string
		// noRef: the input is invalid, the reference evaluator does not
		// model it.
		noRef bool
	}{
		{name: "no policy: nothing enforced", want: ep(false, false, 0, nil, nil)},
		{
			name:     "policy in another namespace does not select",
			policies: []string{"metadata: {name: p1, namespace: 'y'}\nspec: {podSelector: {}}"},
			want:     ep(false, false, 0, nil, nil),
		},
		{
			name:     "policy whose podSelector does not match",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {matchLabels: {app: b}}}"},
			want:     ep(false, false, 0, nil, nil),
		},
		{
			name:     "default-deny ingress, implied policyTypes",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}}"},
			want:     ep(true, false, 1, nil, nil),
		},
		{
			name:     "default-deny egress, explicit policyTypes",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, policyTypes: [Egress]}"},
			want:     ep(false, true, 1, nil, nil),
		},
		{
			name:     "default-deny both",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress, Egress]}"},
			want:     ep(true, true, 1, nil, nil),
		},
		{
			name:     "implied egress when the policy has egress rules (and ingress always)",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, egress: [{}]}"},
			want:     ep(true, true, 1, nil, []dp.PeerEntry{entry("0.0.0.0/0", anyRule(1, 0)), entry("::/0", anyRule(1, 0))}),
		},
		{
			name:     "explicit Ingress ignores egress rules",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, policyTypes: [Ingress], egress: [{}]}"},
			want:     ep(true, false, 1, nil, nil),
		},
		{
			name:     "allow-all ingress: rule without peers and ports",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("0.0.0.0/0", anyRule(1, 0)), entry("::/0", anyRule(1, 0))}, nil),
		},
		{
			name:     "podSelector peer: pods of the policy's namespace",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.11/32", anyRule(1, 0))}, nil),
		},
		{
			name: "podSelector peer of a policy in y names y's pods",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
				"metadata: {name: p2, namespace: 'y'}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}",
			},
			want: ep(true, false, 1, nil, nil),
		},
		{
			name:     "empty podSelector peer: every pod of the namespace (not hostNetwork, not terminal)",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}"},
			want: ep(true, false, 1, []dp.PeerEntry{
				entry("10.0.0.10/32", anyRule(1, 0)), entry("10.0.0.11/32", anyRule(1, 0)), entry("fd00::10/128", anyRule(1, 0))}, nil),
		},
		{
			name:     "namespaceSelector peer",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: 'y'}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.20/32", anyRule(1, 0))}, nil),
		},
		{
			name:     "namespaceSelector on kubernetes.io/metadata.name",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.20/32", anyRule(1, 0))}, nil),
		},
		{
			name:     "empty namespaceSelector: pods of every namespace",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}"},
			want: ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.10/32", anyRule(1, 0)), entry("10.0.0.11/32", anyRule(1, 0)),
				entry("10.0.0.20/32", anyRule(1, 0)), entry("fd00::10/128", anyRule(1, 0))}, nil),
		},
		{
			name:     "podSelector and namespaceSelector in one peer: AND",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}, namespaceSelector: {matchLabels: {team: 'y'}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.20/32", anyRule(1, 0))}, nil),
		},
		{
			name:     "podSelector and namespaceSelector as two peers: OR",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}, {namespaceSelector: {matchLabels: {team: 'y'}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.11/32", anyRule(1, 0)), entry("10.0.0.20/32", anyRule(1, 0))}, nil),
		},
		{
			name:     "ipBlock with except: the hole carries no rules",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.128/25, 10.0.0.10/32]}}]}]}"},
			want: ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.0/24", anyRule(1, 0)), entry("10.0.0.128/25"),
				entry("10.0.0.10/32")}, nil),
		},
		{
			name: "except keeps the rules of other allows covering it",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}], ports: [{port: 80}]}]}",
				"metadata: {name: p2}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: 53, protocol: UDP}]}]}",
			},
			want: ep(true, false, 1, []dp.PeerEntry{
				entry("10.0.0.0/8", rule(dp.UDP, 53, 53, 2, 0)),
				entry("10.0.0.0/16", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 2, 0)),
				entry("10.0.1.0/24", rule(dp.UDP, 53, 53, 2, 0)),
			}, nil),
		},
		{
			name: "except inside an except-free allow of the same rules changes nothing",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]}]}",
				"metadata: {name: p2}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.1.0/24}}]}]}",
			},
			want: ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.0/16", anyRule(1, 0)), entry("10.0.1.0/24", anyRule(2, 0))}, nil),
		},
		{
			name:     "IPv6 ipBlock with except",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 'fd00::/64', except: ['fd00::/112']}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("fd00::/64", anyRule(1, 0)), entry("fd00::/112")}, nil),
		},
		{
			name: "rule without peers covers pod peers: the pod prefix carries the union",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}]}, {from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 53, protocol: UDP}]}]}",
			},
			want: ep(true, false, 1, []dp.PeerEntry{
				entry("0.0.0.0/0", rule(dp.TCP, 80, 80, 1, 0)),
				entry("10.0.0.11/32", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 1, 1)),
				entry("::/0", rule(dp.TCP, 80, 80, 1, 0)),
			}, nil),
		},
		{
			name: "ports: numeric, endPort, protocols, default TCP, protocol without port",
			policies: []string{`metadata: {name: p1}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports:
    - port: 80
    - {port: 8000, endPort: 8010, protocol: TCP}
    - {port: 53, protocol: UDP}
    - {protocol: SCTP}
    - {port: 9000, endPort: 9001, protocol: SCTP}`},
			want: ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.11/32",
				rule(dp.TCP, 80, 80, 1, 0), rule(dp.TCP, 8000, 8010, 1, 0), rule(dp.UDP, 53, 53, 1, 0), rule(dp.SCTP, 0, 0, 1, 0))}, nil),
		},
		{
			name: "named ingress ports resolve against the local pod",
			policies: []string{`metadata: {name: p1}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: http}, {port: dns, protocol: UDP}]
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: http, protocol: UDP}, {port: nope}]`},
			// Rule 1 resolves to nothing: it allows nothing (not everything).
			want: ep(true, false, 1, []dp.PeerEntry{
				entry("0.0.0.0/0", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 1, 0)),
				entry("::/0", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 1, 0))}, nil),
		},
		{
			name: "named egress ports resolve per destination pod",
			policies: []string{`metadata: {name: p1}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{port: http}, {port: 443}]`},
			want: ep(false, true, 1, nil, []dp.PeerEntry{
				entry("10.0.0.0/24", rule(dp.TCP, 443, 443, 1, 1)),
				entry("10.0.0.10/32", rule(dp.TCP, 80, 80, 1, 0), rule(dp.TCP, 443, 443, 1, 1)),
				entry("10.0.0.11/32", rule(dp.TCP, 443, 443, 1, 1), rule(dp.TCP, 8080, 8080, 1, 0)),
				entry("10.0.0.20/32", rule(dp.TCP, 81, 81, 1, 0), rule(dp.TCP, 443, 443, 1, 1)),
				entry("fd00::10/128", rule(dp.TCP, 80, 80, 1, 0)),
			}),
		},
		{
			// The upstream semantics resolve an egress named port against the
			// destination: with an ipBlock peer, the pods inside the block
			// (outside its excepts) that expose the port, each on its own
			// number; the block itself gets only the numeric ports.
			name: "named egress port with an ipBlock: the block's pods that expose it, minus except",
			policies: []string{`metadata: {name: p1}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.11/32]}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 10.0.0.16/28}}]
    ports: [{port: http}, {port: 9000}]
  - to: [{ipBlock: {cidr: "fd00::/64"}}]
    ports: [{port: http, protocol: UDP}]`},
			want: ep(false, true, 1, nil, []dp.PeerEntry{
				entry("10.0.0.16/28", rule(dp.TCP, 9000, 9000, 1, 1)),
				entry("10.0.0.10/32", rule(dp.TCP, 80, 80, 1, 0)),
				entry("10.0.0.20/32", rule(dp.TCP, 81, 81, 1, 0), rule(dp.TCP, 9000, 9000, 1, 1)),
			}),
		},
		{
			name: "named ingress port with an ipBlock peer: the local pod's port",
			policies: []string{`metadata: {name: p1}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]
    ports: [{port: http}]`},
			want: ep(true, false, 1, []dp.PeerEntry{
				entry("192.0.2.0/24", rule(dp.TCP, 80, 80, 1, 0)),
				entry("192.0.2.128/25"),
			}, nil),
		},
		{
			name:     "named egress port in a rule without peers: every pod with that port",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: http}, {port: 53, protocol: UDP}]}]}"},
			want: ep(false, true, 1, nil, []dp.PeerEntry{
				entry("0.0.0.0/0", rule(dp.UDP, 53, 53, 1, 0)),
				entry("10.0.0.10/32", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 1, 0)),
				entry("10.0.0.11/32", rule(dp.TCP, 8080, 8080, 1, 0), rule(dp.UDP, 53, 53, 1, 0)),
				entry("10.0.0.20/32", rule(dp.TCP, 81, 81, 1, 0), rule(dp.UDP, 53, 53, 1, 0)),
				entry("::/0", rule(dp.UDP, 53, 53, 1, 0)),
				entry("fd00::10/128", rule(dp.TCP, 80, 80, 1, 0), rule(dp.UDP, 53, 53, 1, 0)),
			}),
		},
		{
			name: "allows are additive across policies; DefaultDenyPolicy is the lowest ID",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, policyTypes: [Egress]}",
				"metadata: {name: p2}\nspec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]}",
				"metadata: {name: p3}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: 'y'}}}], ports: [{port: 81}]}]}",
			},
			want: ep(true, true, 1, []dp.PeerEntry{entry("10.0.0.11/32", anyRule(2, 0)), entry("10.0.0.20/32", rule(dp.TCP, 81, 81, 3, 0))}, nil),
		},
		{
			name: "duplicates merge to the lowest policy and rule; covered rules go",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}, {from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}, {port: 70, endPort: 90}]}]}",
				"metadata: {name: p2}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}, {port: 75}]}]}",
			},
			want: ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.11/32", rule(dp.TCP, 70, 90, 1, 1))}, nil),
		},
		{
			name: "a pod prefix adding nothing to a covering allow-all is dropped",
			policies: []string{
				"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{}]}",
				"metadata: {name: p2}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]}",
			},
			want: ep(true, false, 1, []dp.PeerEntry{entry("0.0.0.0/0", anyRule(1, 0)), entry("::/0", anyRule(1, 0))}, nil),
		},
		{
			name: "adjacent port ranges merge when a prefix has too many rules",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{ports: [" +
				portList(1000, 1, 17) + "]}]}"},
			want: ep(true, false, 1, []dp.PeerEntry{entry("0.0.0.0/0", rule(dp.TCP, 1000, 1016, 1, 0)), entry("::/0", rule(dp.TCP, 1000, 1016, 1, 0))}, nil),
		},
		{
			// Fail closed: never the looser policy programmed before.
			name: "too many rules even after merging: problem, the direction denies everything",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{ports: [" +
				portList(1000, 2, 17) + "]}]}"},
			want:     ep(true, false, 1, nil, nil),
			problems: []string{ReasonTooManyRules},
			noRef:    true,
		},
		{
			name:     "invalid except: the peer allows nothing, with a problem",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/25]}}, {podSelector: {matchLabels: {app: b}}}]}]}"},
			want:     ep(true, false, 1, []dp.PeerEntry{entry("10.0.0.11/32", anyRule(1, 0))}, nil),
			problems: []string{ReasonInvalidPolicy},
			noRef:    true,
		},
		{
			name:     "invalid endPort below port: the port allows nothing",
			policies: []string{"metadata: {name: p1}\nspec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}"},
			want:     ep(true, false, 1, nil, nil),
			problems: []string{ReasonInvalidPolicy},
			noRef:    true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pods, nss := testCluster()
			in := Inputs{NodeName: testNode, Pods: pods, Namespaces: nss, IDs: NewIDs()}
			for _, doc := range tt.policies {
				in.Policies = append(in.Policies, mustPolicy(t, doc))
			}
			out, problems := Compile(in)
			var reasons []string
			for _, p := range problems {
				reasons = append(reasons, p.Reason)
			}
			if !reflect.DeepEqual(reasons, tt.problems) {
				t.Fatalf("problems %v, want reasons %v", problems, tt.problems)
			}
			// Only x/a is an endpoint: hostNetwork, terminal, IP-less and
			// remote pods are not.
			want := map[uint32]dp.EndpointPolicy{1: tt.want}
			if !reflect.DeepEqual(out, want) {
				t.Fatalf("got\n%s\nwant\n%s", dump(out), dump(want))
			}
			if !tt.noRef {
				checkCompiled(t, in, out, problems, nil)
			}
		})
	}
}

func portList(first, step, n int) string {
	var s []string
	for i := range n {
		s = append(s, fmt.Sprintf("{port: %d}", first+i*step))
	}
	return strings.Join(s, ", ")
}

func dump(m map[uint32]dp.EndpointPolicy) string {
	var b strings.Builder
	for id, ep := range m {
		fmt.Fprintf(&b, "endpoint %d ips=%v in=%v eg=%v deny=%d\n", id, ep.IPs, ep.IngressEnforced, ep.EgressEnforced, ep.DefaultDenyPolicy)
		for _, d := range []struct {
			n string
			e []dp.PeerEntry
		}{{"ingress", ep.Ingress}, {"egress", ep.Egress}} {
			for _, e := range d.e {
				fmt.Fprintf(&b, "  %s %s %+v\n", d.n, e.Prefix, e.Rules)
			}
		}
	}
	return b.String()
}

// A hostNetwork pod matching a policy's selector is not an endpoint even on
// this node; a pod on another node is not ours.
func TestCompileEndpointsOnlyLocalPodNetwork(t *testing.T) {
	pods, nss := testCluster()
	in := Inputs{NodeName: "node-2", Pods: pods, Namespaces: nss, IDs: NewIDs(),
		Policies: []*networkingv1.NetworkPolicy{mustPolicy(t, "metadata: {name: p1}\nspec: {podSelector: {}}")},
		IfIndex:  func(p *corev1.Pod) int { return len(p.Name) }}
	out, _ := Compile(in)
	var names []string
	for _, pod := range pods {
		if _, ok := out[in.IDs.Endpoint(pod.UID)]; ok {
			names = append(names, pod.Namespace+"/"+pod.Name)
		}
	}
	if want := []string{"x/b", "y/a"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("endpoints %v, want %v", names, want)
	}
	if got := out[in.IDs.Endpoint("x-b")]; !got.IngressEnforced || got.IfIndex != 1 {
		t.Fatalf("x/b: %+v", got)
	}
	if got := out[in.IDs.Endpoint("y-a")]; got.IngressEnforced {
		t.Fatalf("y/a is not selected: %+v", got)
	}
}

func TestIDs(t *testing.T) {
	ids := NewIDs()
	a, b := ids.Policy("x", "a"), ids.Policy("x", "b")
	if a == 0 || b == 0 || a == b || ids.Policy("x", "a") != a {
		t.Fatalf("ids %d %d", a, b)
	}
	if n, ok := ids.PolicyName(b); !ok || n != "x/b" {
		t.Fatalf("name of %d: %q", b, n)
	}
	ids.ReleasePolicy("x", "a")
	if c := ids.Policy("x", "a"); c == a || c == b {
		t.Fatalf("released ID reused: %d", c)
	}
	if got := len(ids.PolicyNames()); got != 2 {
		t.Fatalf("%d names", got)
	}
}
