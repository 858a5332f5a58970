package trace

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// Reason of an l7 request denied on Envoy's default chain.
const L7ReasonUnselected = "unselected"

// L7RequestEvent converts one entry of the node's Envoy access log stream
// (gRPC ALS on the xDS socket, xds.ServerOptions.OnAccessLog) into an l7
// event: the request, Envoy's RBAC decision and the L7Policy behind it.
//
//   - allowed: the RBAC filter names the rule that matched, as
//     xds.PolicyName "ns/name/rule"; Policy is that L7Policy and rule.
//   - denied (403, no rule matched): the L7Policies selecting the
//     destination denied it, a constant of the filter chain that travels as
//     the custom tag xds.ALSTagL7Policies. Policy names it when it is one
//     (the usual case), Message lists them all.
//   - denied on the default chain (no L7Policy selects the destination: a
//     connection steered during a policy change): reason "unselected".
func L7RequestEvent(e *alsdata.HTTPAccessLogEntry, node string, pods PodNamer) apiv1.TraceEvent {
	c := e.GetCommonProperties()
	req, resp := e.GetRequest(), e.GetResponse()
	out := apiv1.TraceEvent{
		Time:        c.GetStartTime().AsTime().UTC(),
		Node:        node,
		Type:        apiv1.TraceTypeL7,
		Protocol:    "TCP",
		Source:      namePeer(addrPort(c.GetDownstreamDirectRemoteAddress()), pods),
		Destination: namePeer(addrPort(c.GetDownstreamLocalAddress()), pods),
		HTTP: &apiv1.TraceHTTP{
			Method:    req.GetRequestMethod().String(),
			Authority: req.GetAuthority(),
			Path:      req.GetPath(),
			Status:    int(resp.GetResponseCode().GetValue()),
		},
	}
	if out.HTTP.Method == core.RequestMethod_METHOD_UNSPECIFIED.String() {
		out.HTTP.Method = ""
	}
	if c.GetStartTime() == nil {
		out.Time = time.Now().UTC()
	}
	rbac := c.GetMetadata().GetFilterMetadata()[xds.RBACMetadataNamespace].GetFields()
	result := rbac[xds.RBACResultKey].GetStringValue()
	details := resp.GetResponseCodeDetails()
	tags := c.GetCustomTags()
	denied := result == "denied" || strings.HasPrefix(details, "rbac_access_denied")
	if !denied {
		out.Verdict = apiv1.TraceVerdictAllowed
		if id := rbac[xds.RBACPolicyKey].GetStringValue(); id != "" {
			out.Policy = l7Policy(id)
			out.Reason = apiv1.TraceReasonPolicy
		}
		return out
	}
	out.Verdict = apiv1.TraceVerdictDenied
	selecting := tags[xds.ALSTagL7Policies]
	if selecting == "" {
		out.Reason = L7ReasonUnselected
		out.Message = "no L7Policy selects the destination (steered while policies changed): denied, fail closed"
		return out
	}
	out.Reason = apiv1.TraceReasonDefaultDeny
	names := strings.Split(selecting, ",")
	if len(names) == 1 {
		ns, name, _ := strings.Cut(names[0], "/")
		out.Policy = &apiv1.TracePolicy{Kind: "L7Policy", Namespace: ns, Name: name}
		out.Message = fmt.Sprintf("no rule of L7Policy %s allowed it", names[0])
	} else {
		out.Message = "no rule of the L7Policies " + strings.Join(names, ", ") + " allowed it"
	}
	return out
}

// l7Policy parses an RBAC policy name, xds.PolicyName's "ns/name/rule".
func l7Policy(id string) *apiv1.TracePolicy {
	p := &apiv1.TracePolicy{Kind: "L7Policy"}
	rest, rule, ok := strings.Cut(id, "/")
	p.Namespace = rest
	if ok {
		p.Name, rule, ok = strings.Cut(rule, "/")
	}
	if ok {
		if i, err := strconv.Atoi(rule); err == nil {
			p.Rule = &i
		}
	}
	return p
}

// addrPort is an Envoy socket address (invalid for a pipe or none).
func addrPort(a *core.Address) netip.AddrPort {
	sa := a.GetSocketAddress()
	ip, err := netip.ParseAddr(sa.GetAddress())
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(sa.GetPortValue()))
}
