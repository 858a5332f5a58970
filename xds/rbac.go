package xds

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

type rbacPolicy = rbacconfig.Policy

// rbacRules is the RBAC of one destination: ALLOW with one policy per rule of
// every L7Policy selecting it. A request matching none gets 403 (Envoy's
// ALLOW action denies what no policy matches). An L7Policy with no rules adds
// no policy, so a pod:port selected only by such policies denies everything.
func rbacRules(d *destination) *rbacconfig.RBAC {
	return &rbacconfig.RBAC{Action: rbacconfig.RBAC_ALLOW, Policies: d.policies}
}

// rbacPolicies converts the rules of p, keyed by PolicyName.
func rbacPolicies(p *v1alpha1.L7Policy, in Input) (map[string]*rbacPolicy, error) {
	out := map[string]*rbacPolicy{}
	for i := range p.Spec.Rules {
		r := &p.Spec.Rules[i]
		perm := permission(r)
		prin, err := principal(p.Namespace, r.From, in)
		if err != nil {
			return nil, fmt.Errorf("l7policy %s/%s rule %d: %w", p.Namespace, p.Name, i, err)
		}
		out[PolicyName(p, i)] = &rbacconfig.Policy{
			Permissions: []*rbacconfig.Permission{perm},
			Principals:  []*rbacconfig.Principal{prin},
		}
	}
	return out, nil
}

func permission(r *v1alpha1.HTTPRule) *rbacconfig.Permission {
	var and []*rbacconfig.Permission
	if len(r.Methods) > 0 {
		var or []*rbacconfig.Permission
		for _, m := range r.Methods {
			or = append(or, headerPerm(&route.HeaderMatcher{
				Name:                 ":method",
				HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: exact(string(m))},
			}))
		}
		and = append(and, anyOfPerm(or))
	}
	if r.Path != nil {
		var sm *matcher.StringMatcher
		switch {
		case r.Path.Exact != nil:
			sm = exact(*r.Path.Exact)
		case r.Path.Prefix != nil:
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: *r.Path.Prefix}}
		case r.Path.Regex != nil:
			sm = &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: *r.Path.Regex}}}
		}
		// url_path is the path without the query string, as users write it.
		and = append(and, &rbacconfig.Permission{Rule: &rbacconfig.Permission_UrlPath{
			UrlPath: &matcher.PathMatcher{Rule: &matcher.PathMatcher_Path{Path: sm}},
		}})
	}
	for _, h := range r.Headers {
		hm := &route.HeaderMatcher{Name: strings.ToLower(h.Name)}
		switch {
		case h.Exact != nil:
			hm.HeaderMatchSpecifier = &route.HeaderMatcher_StringMatch{StringMatch: exact(*h.Exact)}
		case h.Prefix != nil:
			hm.HeaderMatchSpecifier = &route.HeaderMatcher_StringMatch{StringMatch: &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Prefix{Prefix: *h.Prefix}}}
		case h.Present != nil:
			hm.HeaderMatchSpecifier = &route.HeaderMatcher_PresentMatch{PresentMatch: true}
			hm.InvertMatch = !*h.Present
		}
		and = append(and, headerPerm(hm))
	}
	switch len(and) {
	case 0:
		return &rbacconfig.Permission{Rule: &rbacconfig.Permission_Any{Any: true}}
	case 1:
		return and[0]
	}
	return &rbacconfig.Permission{Rule: &rbacconfig.Permission_AndRules{AndRules: &rbacconfig.Permission_Set{Rules: and}}}
}

func headerPerm(h *route.HeaderMatcher) *rbacconfig.Permission {
	return &rbacconfig.Permission{Rule: &rbacconfig.Permission_Header{Header: h}}
}

func anyOfPerm(or []*rbacconfig.Permission) *rbacconfig.Permission {
	if len(or) == 1 {
		return or[0]
	}
	return &rbacconfig.Permission{Rule: &rbacconfig.Permission_OrRules{OrRules: &rbacconfig.Permission_Set{Rules: or}}}
}

func exact(s string) *matcher.StringMatcher {
	return &matcher.StringMatcher{MatchPattern: &matcher.StringMatcher_Exact{Exact: s}}
}

// principal is the OR of the rule's peers, matched on the socket peer
// (direct_remote_ip), never on X-Forwarded-For, which the client controls.
// Selectors resolve to the pod IPs known now; the agent rebuilds when pods
// or their labels change.
func principal(ns string, from []v1alpha1.L7Peer, in Input) (*rbacconfig.Principal, error) {
	if len(from) == 0 {
		return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Any{Any: true}}, nil
	}
	var or []*rbacconfig.Principal
	for i := range from {
		p, err := peerPrincipal(ns, &from[i], in)
		if err != nil {
			return nil, fmt.Errorf("from[%d]: %w", i, err)
		}
		or = append(or, p...)
	}
	if len(or) == 0 {
		// Selectors that match no pod today: a principal nothing matches.
		return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_NotId{NotId: &rbacconfig.Principal{Identifier: &rbacconfig.Principal_Any{Any: true}}}}, nil
	}
	if len(or) == 1 {
		return or[0], nil
	}
	return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_OrIds{OrIds: &rbacconfig.Principal_Set{Ids: or}}}, nil
}

func peerPrincipal(ns string, peer *v1alpha1.L7Peer, in Input) ([]*rbacconfig.Principal, error) {
	if b := peer.IPBlock; b != nil {
		outer, err := netip.ParsePrefix(b.CIDR)
		if err != nil {
			return nil, err
		}
		p := cidrPrincipal(outer.Masked())
		if len(b.Except) == 0 {
			return []*rbacconfig.Principal{p}, nil
		}
		var ex []*rbacconfig.Principal
		for _, e := range b.Except {
			pe, err := netip.ParsePrefix(e)
			if err != nil {
				return nil, err
			}
			ex = append(ex, cidrPrincipal(pe.Masked()))
		}
		not := &rbacconfig.Principal{Identifier: &rbacconfig.Principal_NotId{NotId: &rbacconfig.Principal{
			Identifier: &rbacconfig.Principal_OrIds{OrIds: &rbacconfig.Principal_Set{Ids: ex}},
		}}}
		return []*rbacconfig.Principal{{Identifier: &rbacconfig.Principal_AndIds{AndIds: &rbacconfig.Principal_Set{Ids: []*rbacconfig.Principal{p, not}}}}}, nil
	}
	podSel := labels.Everything()
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return nil, err
		}
		podSel = s
	}
	var nsSel labels.Selector
	if peer.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return nil, err
		}
		nsSel = s
	}
	var ips []netip.Addr
	seen := map[netip.Addr]bool{}
	for _, pod := range in.Pods {
		if pod.HostNetwork {
			continue
		}
		if nsSel == nil {
			if pod.Namespace != ns {
				continue
			}
		} else if !nsSel.Matches(labels.Set(in.Namespaces[pod.Namespace])) {
			continue
		}
		if !podSel.Matches(labels.Set(pod.Labels)) {
			continue
		}
		for _, ip := range pod.IPs {
			ip = ip.Unmap()
			if seen[ip] {
				continue
			}
			seen[ip] = true
			ips = append(ips, ip)
		}
	}
	// Sorted, so the version does not depend on the order pods were listed in.
	slices.SortFunc(ips, netip.Addr.Compare)
	out := make([]*rbacconfig.Principal, 0, len(ips))
	for _, ip := range ips {
		out = append(out, cidrPrincipal(netip.PrefixFrom(ip, ip.BitLen())))
	}
	return out, nil
}

func cidrPrincipal(p netip.Prefix) *rbacconfig.Principal {
	return &rbacconfig.Principal{Identifier: &rbacconfig.Principal_DirectRemoteIp{DirectRemoteIp: &core.CidrRange{
		AddressPrefix: p.Addr().String(),
		PrefixLen:     wrapperspb.UInt32(uint32(p.Bits())),
	}}}
}
