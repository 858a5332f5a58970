package trace

import (
	"net/netip"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

func alsEntry(code uint32, details string, rbac map[string]any, tags map[string]string) *alsdata.HTTPAccessLogEntry {
	sock := func(ip string, port uint32) *core.Address {
		return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{Address: ip,
			PortSpecifier: &core.SocketAddress_PortValue{PortValue: port}}}}
	}
	c := &alsdata.AccessLogCommon{
		StartTime:                     timestamppb.New(epoch),
		DownstreamDirectRemoteAddress: sock("10.0.0.1", 40000),
		DownstreamLocalAddress:        sock("10.0.0.2", 8080),
		CustomTags:                    tags,
	}
	if rbac != nil {
		st, _ := structpb.NewStruct(rbac)
		c.Metadata = &core.Metadata{FilterMetadata: map[string]*structpb.Struct{xds.RBACMetadataNamespace: st}}
	}
	return &alsdata.HTTPAccessLogEntry{CommonProperties: c,
		Request:  &alsdata.HTTPRequestProperties{RequestMethod: core.RequestMethod_POST, Authority: "api.shop:8080", Path: "/orders/1"},
		Response: &alsdata.HTTPResponseProperties{ResponseCode: wrapperspb.UInt32(code), ResponseCodeDetails: details}}
}

func TestL7RequestEvent(t *testing.T) {
	pods := podsByIPs{"10.0.0.1": {"a", "client"}, "10.0.0.2": {"shop", "api"}}
	rule := func(i int) *int { return &i }
	for _, tc := range []struct {
		name            string
		e               *alsdata.HTTPAccessLogEntry
		verdict, reason string
		policy          *apiv1.TracePolicy
		message         string
	}{
		{"allowed by a rule", alsEntry(201, "via_upstream", map[string]any{xds.RBACPolicyKey: "shop/api/2", xds.RBACResultKey: "allowed"},
			map[string]string{xds.ALSTagL7Policies: "shop/api"}),
			apiv1.TraceVerdictAllowed, apiv1.TraceReasonPolicy, &apiv1.TracePolicy{Kind: "L7Policy", Namespace: "shop", Name: "api", Rule: rule(2)}, ""},
		{"denied: the one selecting policy", alsEntry(403, "rbac_access_denied_matched_policy[none]", map[string]any{xds.RBACResultKey: "denied"},
			map[string]string{xds.ALSTagL7Policies: "shop/api"}),
			apiv1.TraceVerdictDenied, apiv1.TraceReasonDefaultDeny, &apiv1.TracePolicy{Kind: "L7Policy", Namespace: "shop", Name: "api"},
			"no rule of L7Policy shop/api allowed it"},
		{"denied: several selecting policies", alsEntry(403, "rbac_access_denied_matched_policy[none]", nil,
			map[string]string{xds.ALSTagL7Policies: "shop/api,shop/extra"}),
			apiv1.TraceVerdictDenied, apiv1.TraceReasonDefaultDeny, nil, "no rule of the L7Policies shop/api, shop/extra allowed it"},
		{"denied on the default chain", alsEntry(403, "rbac_access_denied_matched_policy[none]", nil, nil),
			apiv1.TraceVerdictDenied, L7ReasonUnselected, nil,
			"no L7Policy selects the destination (steered while policies changed): denied, fail closed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := L7RequestEvent(tc.e, "n1", pods)
			if got.Verdict != tc.verdict || got.Reason != tc.reason || got.Message != tc.message {
				t.Errorf("verdict %q reason %q message %q", got.Verdict, got.Reason, got.Message)
			}
			if (got.Policy == nil) != (tc.policy == nil) || got.Policy != nil && (got.Policy.Kind != tc.policy.Kind ||
				got.Policy.Namespace != tc.policy.Namespace || got.Policy.Name != tc.policy.Name ||
				(got.Policy.Rule == nil) != (tc.policy.Rule == nil) || got.Policy.Rule != nil && *got.Policy.Rule != *tc.policy.Rule) {
				t.Errorf("policy %+v, want %+v", got.Policy, tc.policy)
			}
			if got.Type != apiv1.TraceTypeL7 || got.Node != "n1" || !got.Time.Equal(epoch) ||
				got.Source != (apiv1.TracePeer{Namespace: "a", Pod: "client", IP: "10.0.0.1", Port: 40000}) ||
				got.Destination != (apiv1.TracePeer{Namespace: "shop", Pod: "api", IP: "10.0.0.2", Port: 8080}) ||
				got.HTTP.Method != "POST" || got.HTTP.Path != "/orders/1" || got.HTTP.Authority != "api.shop:8080" ||
				got.HTTP.Status != int(tc.e.GetResponse().GetResponseCode().GetValue()) {
				t.Errorf("event %+v http %+v", got, got.HTTP)
			}
		})
	}
}

type podsByIPs map[string][2]string

func (p podsByIPs) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	v, ok := p[ip.String()]
	return types.NamespacedName{Namespace: v[0], Name: v[1]}, ok
}
