package xds

import (
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

func ptr[T any](v T) *T { return &v }

// shopInput: pod shop/api (app=api) at apiIP selected on port by one policy
// with two rules, a client pod shop/web and a pod in namespace other.
func shopInput(apiIP netip.Addr, port int32) Input {
	pol := &v1alpha1.L7Policy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api"},
		Spec: v1alpha1.L7PolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Ports:       []v1alpha1.L7PolicyPort{{Port: port}},
			Rules: []v1alpha1.HTTPRule{
				{Methods: []v1alpha1.HTTPMethod{"GET", "HEAD"}, Path: &v1alpha1.HTTPPathMatch{Prefix: ptr("/public/")}},
				{
					Methods: []v1alpha1.HTTPMethod{"POST"},
					Path:    &v1alpha1.HTTPPathMatch{Regex: ptr(`/orders/[0-9]+`)},
					Headers: []v1alpha1.HTTPHeaderMatch{{Name: "X-Tenant", Exact: ptr("a")}, {Name: "x-debug", Present: ptr(false)}},
					From:    []v1alpha1.L7Peer{{IPBlock: &v1alpha1.IPBlock{CIDR: "127.0.0.0/8", Except: []string{"127.0.0.99/32"}}}},
				},
				{
					Path: &v1alpha1.HTTPPathMatch{Exact: ptr("/internal")},
					From: []v1alpha1.L7Peer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}},
						{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "ops"}}},
					},
				},
			},
		},
	}
	return Input{
		Policies: []*v1alpha1.L7Policy{pol},
		Pods: []Pod{
			{Namespace: "shop", Name: "api", Node: "n1", Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{apiIP}},
			{Namespace: "shop", Name: "web", Node: "n2", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.2.5")}},
			{Namespace: "other", Name: "tool", Node: "n2", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.3.7")}},
			{Namespace: "ops", Name: "probe", Node: "n1", Labels: map[string]string{}, IPs: []netip.Addr{netip.MustParseAddr("10.0.4.1"), netip.MustParseAddr("fd00::4:1")}},
			{Namespace: "shop", Name: "hostnet", Node: "n1", Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{netip.MustParseAddr("192.168.1.10")}, HostNetwork: true},
		},
		Namespaces: map[string]map[string]string{"shop": {}, "other": {}, "ops": {"team": "ops"}},
	}
}
