// Package netpol compiles Kubernetes NetworkPolicies (networking.k8s.io/v1)
// into the per-endpoint policies of the bpf/netpol datapath and keeps them
// in step with the API (sync.go).
//
// The compiler is pure: it reads policies, pods and namespaces and returns
// one EndpointPolicy per local pod. Peers are expanded to prefixes (pod
// selectors to pod IPs, ipBlocks to CIDRs); because the datapath lets the
// longest matching prefix decide alone, every prefix carries the union of
// the rules of all prefixes covering it, and an ipBlock `except` becomes a
// prefix carrying only the rules of the other allows that cover it.
package netpol

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"sort"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// Problem reasons; the agent uses them as Kubernetes Event reasons.
const (
	// ReasonInvalidPolicy: part of a policy cannot be compiled (the API
	// server normally rejects it); that part allows nothing.
	ReasonInvalidPolicy = "NetworkPolicyInvalid"
	// ReasonTooManyRules: a prefix of the endpoint would carry more than
	// dp.MaxRulesPerPrefix rules even after merging port ranges; the
	// endpoint keeps its previous policy.
	ReasonTooManyRules = "NetworkPolicyTooManyRules"
)

// Problem is something the compiler could not honour.
type Problem struct {
	// Namespace/Pod name the endpoint affected; empty for a policy-wide
	// problem.
	Namespace, Pod string
	// Policy is namespace/name of the policy at fault, when one is.
	Policy  string
	Reason  string
	Message string
}

func (p Problem) String() string {
	s := p.Reason + ": " + p.Message
	if p.Policy != "" {
		s = "policy " + p.Policy + ": " + s
	}
	if p.Pod != "" {
		s = "pod " + p.Namespace + "/" + p.Pod + ": " + s
	}
	return s
}

// Inputs is everything Compile reads.
type Inputs struct {
	NodeName string
	// NodeIPs are the node's own addresses. The compiler does not turn them
	// into peer entries: the datapath allows node<->pod traffic (kubelet
	// probes) before any policy lookup (Datapath.SetHostIPs).
	NodeIPs    []netip.Addr
	Policies   []*networkingv1.NetworkPolicy
	Pods       []*corev1.Pod
	Namespaces []*corev1.Namespace
	// IDs keeps policy and endpoint IDs stable across compilations; nil
	// uses a fresh allocator.
	IDs *IDs
	// IfIndex, when set, fills EndpointPolicy.IfIndex.
	IfIndex func(*corev1.Pod) int
}

// Compile returns the policy of every local pod, keyed by endpoint ID. A pod
// with a ReasonTooManyRules problem gets its fail-closed policy (the
// direction that did not fit denies everything).
func Compile(in Inputs) (map[uint32]dp.EndpointPolicy, []Problem) {
	ids := in.IDs
	if ids == nil {
		ids = NewIDs()
	}
	// Assign policy IDs in name order so a fresh allocator gives the same
	// IDs (and default-deny attribution) whatever order the caches list in.
	pols := slices.Clone(in.Policies)
	slices.SortFunc(pols, func(a, b *networkingv1.NetworkPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	for _, p := range pols {
		ids.Policy(p.Namespace, p.Name)
	}
	c := &compiler{src: newSnapshot(pols, in.Pods, in.Namespaces), ids: ids}
	out := map[uint32]dp.EndpointPolicy{}
	var problems []Problem
	for _, pod := range in.Pods {
		if !IsLocalEndpoint(pod, in.NodeName) {
			continue
		}
		ep, probs, _ := c.Endpoint(pod)
		problems = append(problems, probs...)
		if in.IfIndex != nil {
			ep.IfIndex = in.IfIndex(pod)
		}
		out[ep.ID] = ep
	}
	return out, dedupProblems(problems)
}

func dedupProblems(ps []Problem) []Problem {
	seen := map[Problem]bool{}
	out := ps[:0]
	for _, p := range ps {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// IsLocalEndpoint reports whether the agent on node enforces policy for pod:
// scheduled there, on the pod network, addressed and not finished.
func IsLocalEndpoint(pod *corev1.Pod, node string) bool {
	return pod.Spec.NodeName == node && node != "" && isPeerPod(pod)
}

// isPeerPod: a pod whose IPs stand for it. hostNetwork pods share the node's
// addresses (never selected, never matched as a pod peer: node traffic is
// the datapath's host exemption); terminal pods' IPs may already be reused.
func isPeerPod(pod *corev1.Pod) bool {
	if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return false
	}
	return len(PodIPs(pod)) > 0
}

// PodIPs are the pod's parsed status IPs.
func PodIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return
		}
		a = a.Unmap()
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	for _, ip := range pod.Status.PodIPs {
		add(ip.IP)
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		add(pod.Status.PodIP)
	}
	return out
}

// source is what the compiler reads: a snapshot for Compile, the informer
// listers for the incremental driver.
type source interface {
	// Policies in one namespace.
	Policies(namespace string) []*networkingv1.NetworkPolicy
	// Pods in one namespace; "" lists all.
	Pods(namespace string) []*corev1.Pod
	Namespaces() []*corev1.Namespace
}

type snapshot struct {
	policies   map[string][]*networkingv1.NetworkPolicy
	pods       map[string][]*corev1.Pod
	all        []*corev1.Pod
	namespaces []*corev1.Namespace
}

func newSnapshot(pols []*networkingv1.NetworkPolicy, pods []*corev1.Pod, nss []*corev1.Namespace) *snapshot {
	s := &snapshot{policies: map[string][]*networkingv1.NetworkPolicy{}, pods: map[string][]*corev1.Pod{}, all: pods, namespaces: nss}
	for _, p := range pols {
		s.policies[p.Namespace] = append(s.policies[p.Namespace], p)
	}
	for _, p := range pods {
		s.pods[p.Namespace] = append(s.pods[p.Namespace], p)
	}
	return s
}

func (s *snapshot) Policies(ns string) []*networkingv1.NetworkPolicy { return s.policies[ns] }
func (s *snapshot) Namespaces() []*corev1.Namespace                  { return s.namespaces }
func (s *snapshot) Pods(ns string) []*corev1.Pod {
	if ns == "" {
		return s.all
	}
	return s.pods[ns]
}

type compiler struct {
	src source
	ids *IDs
}

// PolicyTypes are the directions a policy enforces: explicit policyTypes,
// else Ingress always and Egress iff it has egress rules.
func PolicyTypes(p *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(p.Spec.PolicyTypes) == 0 {
		return true, len(p.Spec.Egress) > 0
	}
	for _, t := range p.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}

// Selects reports whether policy p applies to pod (same namespace, pod
// selector matches, pod on the pod network). An invalid selector selects
// nothing.
func Selects(p *networkingv1.NetworkPolicy, pod *corev1.Pod) bool {
	if p.Namespace != pod.Namespace || pod.Spec.HostNetwork {
		return false
	}
	sel, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
	if err != nil {
		return false
	}
	return sel.Matches(labels.Set(pod.Labels))
}

func policyKey(p *networkingv1.NetworkPolicy) string { return p.Namespace + "/" + p.Name }

// allow is one expanded peer of one rule: rules allowed to/from every
// address of prefix except the except prefixes.
type allow struct {
	prefix netip.Prefix
	except []netip.Prefix
	rules  []dp.PortRule
}

// holds reports whether ip is inside a's prefix and outside its excepts.
func (a allow) holds(ip netip.Addr) bool {
	ip = ip.Unmap()
	if !a.prefix.Contains(ip) {
		return false
	}
	return !slices.ContainsFunc(a.except, func(e netip.Prefix) bool { return e.Contains(ip) })
}

var (
	allV4 = netip.MustParsePrefix("0.0.0.0/0")
	allV6 = netip.MustParsePrefix("::/0")
)

// Endpoint compiles the policy of one local pod. ok is false when the
// policies do not fit the datapath (a ReasonTooManyRules problem says why);
// ep then denies every packet of each direction that did not fit.
func (c *compiler) Endpoint(pod *corev1.Pod) (ep dp.EndpointPolicy, problems []Problem, ok bool) {
	ep = dp.EndpointPolicy{ID: c.ids.Endpoint(pod.UID), IPs: PodIPs(pod)}
	type selected struct {
		id uint32
		p  *networkingv1.NetworkPolicy
	}
	var sel []selected
	for _, p := range c.src.Policies(pod.Namespace) {
		if _, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector); err != nil {
			problems = append(problems, Problem{Policy: policyKey(p), Reason: ReasonInvalidPolicy,
				Message: fmt.Sprintf("podSelector: %v", err)})
			continue
		}
		if Selects(p, pod) {
			sel = append(sel, selected{c.ids.Policy(p.Namespace, p.Name), p})
		}
	}
	slices.SortFunc(sel, func(a, b selected) int { return cmp.Compare(a.id, b.id) })

	var in, eg []allow
	for _, s := range sel {
		ing, egr := PolicyTypes(s.p)
		if ing {
			ep.IngressEnforced = true
			for i, r := range s.p.Spec.Ingress {
				a, probs := c.ruleAllows(s.p, s.id, i, r.From, r.Ports, dp.Ingress, pod)
				in = append(in, a...)
				problems = append(problems, probs...)
			}
		}
		if egr {
			ep.EgressEnforced = true
			for i, r := range s.p.Spec.Egress {
				a, probs := c.ruleAllows(s.p, s.id, i, r.To, r.Ports, dp.Egress, pod)
				eg = append(eg, a...)
				problems = append(problems, probs...)
			}
		}
		if (ing || egr) && ep.DefaultDenyPolicy == 0 {
			ep.DefaultDenyPolicy = s.id // sel is sorted: the lowest ID
		}
	}
	ok = true
	for _, d := range []struct {
		enforced bool
		allows   []allow
		out      *[]dp.PeerEntry
		name     string
	}{{ep.IngressEnforced, in, &ep.Ingress, "ingress"}, {ep.EgressEnforced, eg, &ep.Egress, "egress"}} {
		if !d.enforced {
			continue
		}
		entries, full := buildEntries(d.allows)
		if full.IsValid() {
			// Fail closed: a policy that cannot be programmed must not
			// leave the pod more open than asked (keeping the previous,
			// looser policy would), so the direction denies everything
			// until the policies fit.
			problems = append(problems, Problem{Namespace: pod.Namespace, Pod: pod.Name, Reason: ReasonTooManyRules,
				Message: fmt.Sprintf("%s peer %s needs more than %d port rules: all %s traffic of the pod is denied until its policies fit (fail closed)",
					d.name, full, dp.MaxRulesPerPrefix, d.name)})
			ok = false
			entries = nil
		}
		*d.out = entries
	}
	return ep, problems, ok
}

// ruleAllows expands one ingress/egress rule of policy p for local pod.
func (c *compiler) ruleAllows(p *networkingv1.NetworkPolicy, id uint32, idx int, peers []networkingv1.NetworkPolicyPeer,
	ports []networkingv1.NetworkPolicyPort, dir dp.Direction, local *corev1.Pod) ([]allow, []Problem) {
	var problems []Problem
	bad := func(format string, args ...any) {
		problems = append(problems, Problem{Policy: policyKey(p), Reason: ReasonInvalidPolicy, Message: fmt.Sprintf(format, args...)})
	}
	rule := uint16(idx)
	// Ingress ports name the local pod's ports; egress ports name the
	// destination's, so a named port there is resolved per destination pod:
	// for a selector peer its pods, for an ipBlock peer the pods whose IPs
	// the block holds (outside its excepts), for no peers every pod.
	var fixed []dp.PortRule
	named := false
	if dir == dp.Ingress {
		fixed = resolvePorts(ports, local, id, rule, bad)
	} else {
		fixed = resolvePorts(ports, nil, id, rule, bad)
		for _, pp := range ports {
			if pp.Port != nil && pp.Port.Type == intstr.String {
				named = true
			}
		}
	}
	perPod := func(peer *corev1.Pod) []dp.PortRule {
		if dir == dp.Ingress || !named {
			return fixed
		}
		return resolvePorts(ports, peer, id, rule, nil)
	}
	var out []allow
	// addPod allows peer's IPs that keep accepts (all when nil); onlyNamed
	// leaves out the numeric ports a wider prefix already carries.
	addPod := func(peer *corev1.Pod, onlyNamed bool, keep func(netip.Addr) bool) {
		rules := perPod(peer)
		if onlyNamed {
			rules = slices.DeleteFunc(slices.Clone(rules), func(r dp.PortRule) bool { return slices.Contains(fixed, r) })
		}
		if len(rules) == 0 {
			return
		}
		for _, ip := range PodIPs(peer) {
			if keep == nil || keep(ip) {
				out = append(out, allow{prefix: netip.PrefixFrom(ip, ip.BitLen()), rules: rules})
			}
		}
	}
	if len(peers) == 0 {
		if len(fixed) > 0 {
			out = append(out, allow{prefix: allV4, rules: fixed}, allow{prefix: allV6, rules: fixed})
		}
		if named {
			// "Every destination" includes every pod, and a pod's named
			// port is one of its ports: allow it per pod IP.
			for _, peer := range c.src.Pods("") {
				if isPeerPod(peer) {
					addPod(peer, true, nil)
				}
			}
		}
		return out, problems
	}
	for pi, peer := range peers {
		if peer.IPBlock != nil {
			if peer.PodSelector != nil || peer.NamespaceSelector != nil {
				bad("rule %d peer %d: ipBlock cannot be combined with selectors", idx, pi)
				continue
			}
			a, err := parseIPBlock(peer.IPBlock)
			if err != nil {
				bad("rule %d peer %d: %v", idx, pi, err)
				continue
			}
			if len(fixed) > 0 {
				a.rules = fixed
				out = append(out, a)
			}
			if named {
				// The block's pods that expose the named port, as the
				// upstream semantics resolve it against the destination.
				for _, peer := range c.src.Pods("") {
					if isPeerPod(peer) {
						addPod(peer, true, a.holds)
					}
				}
			}
			continue
		}
		if peer.PodSelector == nil && peer.NamespaceSelector == nil {
			bad("rule %d peer %d: empty peer", idx, pi)
			continue
		}
		pods, err := c.peerPods(p.Namespace, peer)
		if err != nil {
			bad("rule %d peer %d: %v", idx, pi, err)
			continue
		}
		for _, peerPod := range pods {
			addPod(peerPod, false, nil)
		}
	}
	return out, problems
}

// peerPods lists the pods a selector peer of a policy in ns names.
func (c *compiler) peerPods(ns string, peer networkingv1.NetworkPolicyPeer) ([]*corev1.Pod, error) {
	podSel := labels.Everything()
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return nil, fmt.Errorf("podSelector: %w", err)
		}
		podSel = s
	}
	namespaces := []string{ns}
	if peer.NamespaceSelector != nil {
		nsSel, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return nil, fmt.Errorf("namespaceSelector: %w", err)
		}
		namespaces = namespaces[:0]
		for _, n := range c.src.Namespaces() {
			if nsSel.Matches(namespaceLabels(n)) {
				namespaces = append(namespaces, n.Name)
			}
		}
	}
	var out []*corev1.Pod
	for _, n := range namespaces {
		for _, pod := range c.src.Pods(n) {
			if isPeerPod(pod) && podSel.Matches(labels.Set(pod.Labels)) {
				out = append(out, pod)
			}
		}
	}
	return out, nil
}

// namespaceLabels includes kubernetes.io/metadata.name, which the API server
// sets on every namespace, so selectors on it work even against caches fed
// by something else (tests, older clusters).
func namespaceLabels(n *corev1.Namespace) labels.Set {
	s := make(labels.Set, len(n.Labels)+1)
	for k, v := range n.Labels {
		s[k] = v
	}
	s[corev1.LabelMetadataName] = n.Name
	return s
}

func parseIPBlock(b *networkingv1.IPBlock) (allow, error) {
	pfx, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return allow{}, fmt.Errorf("ipBlock cidr: %w", err)
	}
	pfx = unmapPrefix(pfx.Masked())
	a := allow{prefix: pfx}
	for _, e := range b.Except {
		ex, err := netip.ParsePrefix(e)
		if err != nil {
			return allow{}, fmt.Errorf("ipBlock except: %w", err)
		}
		ex = unmapPrefix(ex.Masked())
		// The API requires a strict subset; anything else is rejected the
		// same way here rather than guessed at.
		if !covers(pfx, ex) || ex.Bits() == pfx.Bits() {
			return allow{}, fmt.Errorf("ipBlock except %s is not inside %s", ex, pfx)
		}
		a.except = append(a.except, ex)
	}
	return a, nil
}

// unmapPrefix turns ::ffff:a.b.c.d/n (n >= 96) into the IPv4 prefix the
// datapath sees for IPv4 packets.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

var protocols = map[corev1.Protocol]dp.Proto{
	corev1.ProtocolTCP:  dp.TCP,
	corev1.ProtocolUDP:  dp.UDP,
	corev1.ProtocolSCTP: dp.SCTP,
}

// resolvePorts turns a rule's ports into port rules. Named ports resolve
// against pod's containerPorts (name and protocol); with pod nil they are
// skipped. An empty list allows everything; a non-empty list none of whose
// entries resolves allows nothing. bad, when not nil, reports invalid
// entries.
func resolvePorts(ports []networkingv1.NetworkPolicyPort, pod *corev1.Pod, id uint32, rule uint16, bad func(string, ...any)) []dp.PortRule {
	if len(ports) == 0 {
		return []dp.PortRule{{Proto: dp.AnyProto, PolicyID: id, Rule: rule}}
	}
	report := func(format string, args ...any) {
		if bad != nil {
			bad("rule %d: "+format, append([]any{rule}, args...)...)
		}
	}
	var out []dp.PortRule
	for _, pp := range ports {
		proto := dp.TCP
		if pp.Protocol != nil {
			p, ok := protocols[*pp.Protocol]
			if !ok {
				report("unknown protocol %q", *pp.Protocol)
				continue
			}
			proto = p
		}
		r := dp.PortRule{Proto: proto, PolicyID: id, Rule: rule}
		switch {
		case pp.Port == nil:
			// every port of the protocol: PortLo == PortHi == 0
		case pp.Port.Type == intstr.Int:
			lo, hi := pp.Port.IntVal, pp.Port.IntVal
			if pp.EndPort != nil {
				hi = *pp.EndPort
			}
			if lo < 1 || lo > 65535 || hi < lo || hi > 65535 {
				report("invalid port range %d-%d", lo, hi)
				continue
			}
			r.PortLo, r.PortHi = uint16(lo), uint16(hi)
		default:
			if pp.EndPort != nil {
				report("endPort %d with named port %q", *pp.EndPort, pp.Port.StrVal)
				continue
			}
			if pod == nil {
				continue
			}
			port, ok := namedPort(pod, pp.Port.StrVal, proto)
			if !ok {
				continue
			}
			r.PortLo, r.PortHi = port, port
		}
		out = append(out, r)
	}
	return out
}

func namedPort(pod *corev1.Pod, name string, proto dp.Proto) (uint16, bool) {
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			p := cp.Protocol
			if p == "" {
				p = corev1.ProtocolTCP
			}
			if cp.Name == name && protocols[p] == proto && cp.ContainerPort > 0 && cp.ContainerPort <= 65535 {
				return uint16(cp.ContainerPort), true
			}
		}
	}
	return 0, false
}

// covers reports whether a contains every address of b.
func covers(a, b netip.Prefix) bool {
	return a.Addr().BitLen() == b.Addr().BitLen() && a.Bits() <= b.Bits() && a.Contains(b.Addr())
}

// buildEntries turns allows into entries disjoint by longest prefix: for
// every prefix that is a CIDR or an except of some allow, the rules of every
// allow that covers it and does not except it. Entries that would change
// nothing (same rules as the nearest shorter entry, or no rules and nothing
// shorter) are dropped. full is the first prefix whose rules do not fit.
func buildEntries(allows []allow) (entries []dp.PeerEntry, full netip.Prefix) {
	if len(allows) == 0 {
		return nil, netip.Prefix{}
	}
	// Host prefixes without excepts (pod peers) are the bulk; a map keeps
	// the work per key independent of how many there are.
	hosts := map[netip.Prefix][]dp.PortRule{}
	var ranges []allow
	keys := map[netip.Prefix]bool{}
	for _, a := range allows {
		keys[a.prefix] = true
		for _, e := range a.except {
			keys[e] = true
		}
		if a.prefix.IsSingleIP() && len(a.except) == 0 {
			hosts[a.prefix] = append(hosts[a.prefix], a.rules...)
		} else {
			ranges = append(ranges, a)
		}
	}
	sorted := make([]netip.Prefix, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Slice(sorted, func(i, j int) bool { return prefixLess(sorted[i], sorted[j]) })

	kept := make([]dp.PeerEntry, 0, len(sorted))
	// Only non-host entries can cover another key, so the parent search
	// looks at those alone and stays cheap with thousands of pod IPs.
	var keptRanges []int
	for _, k := range sorted {
		var rules []dp.PortRule
		if k.IsSingleIP() {
			rules = append(rules, hosts[k]...)
		}
		for _, a := range ranges {
			if !covers(a.prefix, k) || slices.ContainsFunc(a.except, func(e netip.Prefix) bool { return covers(e, k) }) {
				continue
			}
			rules = append(rules, a.rules...)
		}
		rules = normalizeRules(rules)
		// sorted is by family then length: every shorter covering key was
		// decided before k.
		var parent []dp.PortRule
		hasParent := false
		for i := len(keptRanges) - 1; i >= 0; i-- {
			if e := kept[keptRanges[i]]; covers(e.Prefix, k) {
				parent, hasParent = e.Rules, true
				break
			}
		}
		if (hasParent && slices.Equal(parent, rules)) || (!hasParent && len(rules) == 0) {
			continue
		}
		if len(rules) > dp.MaxRulesPerPrefix {
			rules = mergeRanges(rules)
			if len(rules) > dp.MaxRulesPerPrefix && !full.IsValid() {
				full = k
			}
		}
		if !k.IsSingleIP() {
			keptRanges = append(keptRanges, len(kept))
		}
		kept = append(kept, dp.PeerEntry{Prefix: k, Rules: rules})
	}
	return kept, full
}

// prefixLess orders IPv4 before IPv6, shorter before longer, then by address.
func prefixLess(a, b netip.Prefix) bool {
	if a.Addr().BitLen() != b.Addr().BitLen() {
		return a.Addr().BitLen() < b.Addr().BitLen()
	}
	if a.Bits() != b.Bits() {
		return a.Bits() < b.Bits()
	}
	return a.Addr().Less(b.Addr())
}

func ruleLess(a, b dp.PortRule) int {
	return cmp.Or(cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.PortLo, b.PortLo), cmp.Compare(a.PortHi, b.PortHi),
		cmp.Compare(a.PolicyID, b.PolicyID), cmp.Compare(a.Rule, b.Rule))
}

func allPorts(r dp.PortRule) bool { return r.PortLo == 0 && r.PortHi == 0 }

// ruleCovers: every packet r allows, s allows.
func ruleCovers(s, r dp.PortRule) bool {
	if s.Proto == dp.AnyProto && allPorts(s) {
		return true
	}
	if s.Proto != r.Proto {
		return false
	}
	if allPorts(s) {
		return true
	}
	return !allPorts(r) && s.PortLo <= r.PortLo && r.PortHi <= s.PortHi
}

// normalizeRules drops rules another rule covers (keeping, among equal ones,
// the lowest policy ID and rule index, so attribution is deterministic) and
// sorts the rest.
func normalizeRules(rules []dp.PortRule) []dp.PortRule {
	if len(rules) == 0 {
		return nil
	}
	rules = slices.Clone(rules)
	// Sorted, equal port ranges come lowest attribution first, which the
	// tie-break below keeps.
	slices.SortFunc(rules, ruleLess)
	out := make([]dp.PortRule, 0, len(rules))
	for i, r := range rules {
		covered := false
		for j, s := range rules {
			if i == j || !ruleCovers(s, r) {
				continue
			}
			// Mutual cover means the same packets: keep the first.
			if ruleCovers(r, s) && i < j {
				continue
			}
			covered = true
			break
		}
		if !covered {
			out = append(out, r)
		}
	}
	return out
}

// mergeRanges joins overlapping or adjacent port ranges of one protocol;
// the joined rule keeps the attribution of its lowest range. Used only when
// a prefix has too many rules: merging loses per-rule attribution.
func mergeRanges(rules []dp.PortRule) []dp.PortRule {
	out := make([]dp.PortRule, 0, len(rules))
	for _, r := range rules { // sorted by proto, then PortLo
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.Proto == r.Proto && !allPorts(*last) && !allPorts(r) && uint32(r.PortLo) <= uint32(last.PortHi)+1 {
				last.PortHi = max(last.PortHi, r.PortHi)
				continue
			}
		}
		out = append(out, r)
	}
	return out
}
