package xds

import (
	grpcal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfig "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcher "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

var apiIP = netip.MustParseAddr("10.0.1.10")

func mustBuild(t *testing.T, in Input, node string, o Options) *Resources {
	t.Helper()
	r, err := Build(in, node, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := Lint(r); err != nil {
		t.Fatalf("lint: %v", err)
	}
	if _, err := r.Snapshot(); err != nil {
		t.Fatal(err)
	}
	return r
}

func defaultRBAC(t *testing.T, r *Resources) (*hcm.HttpConnectionManager, *rbacconfig.RBAC) {
	t.Helper()
	return fcRBAC(t, r.Listeners[0].DefaultFilterChain)
}

func chainRBAC(t *testing.T, r *Resources, i int) (*hcm.HttpConnectionManager, *rbacconfig.RBAC) {
	t.Helper()
	return fcRBAC(t, r.Listeners[0].FilterChains[i])
}

func fcRBAC(t *testing.T, fc *listener.FilterChain) (*hcm.HttpConnectionManager, *rbacconfig.RBAC) {
	t.Helper()
	var m hcm.HttpConnectionManager
	if err := fc.Filters[0].GetTypedConfig().UnmarshalTo(&m); err != nil {
		t.Fatal(err)
	}
	var rb rbacfilter.RBAC
	if err := m.HttpFilters[0].GetTypedConfig().UnmarshalTo(&rb); err != nil {
		t.Fatal(err)
	}
	return &m, rb.Rules
}

func TestBuildLayout(t *testing.T) {
	r := mustBuild(t, shopInput(apiIP, 8080), "n1", Options{AccessLogPath: "/dev/stdout"})
	if len(r.Listeners) != 1 || r.Listeners[0].Name != ListenerName {
		t.Fatalf("listeners: %v", r.Listeners)
	}
	l := r.Listeners[0]
	if got := l.Address.GetSocketAddress(); got.Address != "127.0.0.1" || got.GetPortValue() != 15001 {
		t.Errorf("default listen address %v", got)
	}
	if len(l.ListenerFilters) != 1 || l.ListenerFilters[0].Name != "envoy.filters.listener.original_dst" {
		t.Errorf("listener filters %v", l.ListenerFilters)
	}
	// The default chain (unselected destinations) denies everything.
	if dc := l.DefaultFilterChain; dc == nil || dc.Name != DefaultChainName || dc.FilterChainMatch != nil {
		t.Errorf("default filter chain %v", dc)
	}
	if _, rb := defaultRBAC(t, r); rb.Action != rbacconfig.RBAC_ALLOW || len(rb.Policies) != 0 {
		t.Errorf("default chain RBAC %v, want ALLOW with no policy", rb)
	}
	// One chain: the hostNetwork pod matched the selector but is skipped.
	if len(l.FilterChains) != 1 || l.FilterChains[0].Name != "10.0.1.10:8080" {
		t.Fatalf("filter chains %v", l.FilterChains)
	}
	m := l.FilterChains[0].FilterChainMatch
	if m.DestinationPort.GetValue() != 8080 || m.PrefixRanges[0].AddressPrefix != "10.0.1.10" || m.PrefixRanges[0].PrefixLen.GetValue() != 32 {
		t.Errorf("filter chain match %v", m)
	}
	mgr, rules := chainRBAC(t, r, 0)
	if rules.Action != rbacconfig.RBAC_ALLOW {
		t.Errorf("action %v, want ALLOW (default deny)", rules.Action)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for k := range rules.Policies {
			if !yield(k) {
				return
			}
		}
	})
	if want := []string{"shop/api/0", "shop/api/1", "shop/api/2"}; !slices.Equal(names, want) {
		t.Errorf("policy names %v, want %v", names, want)
	}
	if n := len(mgr.HttpFilters); n != 2 || mgr.HttpFilters[n-1].Name != "envoy.filters.http.router" {
		t.Errorf("http filters %v", mgr.HttpFilters)
	}
	if len(r.Clusters) != 1 || r.Clusters[0].Name != OriginalDstCluster || r.Clusters[0].GetType() != cluster.Cluster_ORIGINAL_DST {
		t.Errorf("clusters %v", r.Clusters)
	}
	// Principals of rule 2: pod shop/web and every pod of namespace ops
	// (both addresses), not other/tool although it carries app=web.
	js, _ := protojson.Marshal(rules.Policies["shop/api/2"])
	for _, want := range []string{`"10.0.2.5"`, `"10.0.4.1"`, `"fd00::4:1"`} {
		if !strings.Contains(string(js), want) {
			t.Errorf("rule 2 principals lack %s: %s", want, js)
		}
	}
	if strings.Contains(string(js), "10.0.3.7") {
		t.Errorf("rule 2 admits other/tool: %s", js)
	}
	js, _ = protojson.Marshal(rules.Policies["shop/api/1"])
	for _, want := range []string{`"x-tenant"`, `"invertMatch":true`, `"regex":"/orders/[0-9]+"`, `"127.0.0.99"`, `"notId"`} {
		if !strings.Contains(string(js), want) {
			t.Errorf("rule 1 lacks %s: %s", want, js)
		}
	}
	if got := r.Destinations; len(got) != 1 || got[0].Pod != "shop/api" || !slices.Equal(got[0].L7Policies, []string{"shop/api"}) {
		t.Errorf("destinations %+v", got)
	}
}

func TestBuildScope(t *testing.T) {
	in := shopInput(apiIP, 8080)
	in.Pods[0].IPs = append(in.Pods[0].IPs, netip.MustParseAddr("fd00::1:10"))
	in.Policies[0].Spec.Ports = append(in.Policies[0].Spec.Ports, v1alpha1.L7PolicyPort{Port: 9090})
	all := mustBuild(t, in, "n2", Options{})
	var names []string
	for _, fc := range all.Listeners[0].FilterChains {
		names = append(names, fc.Name)
	}
	if want := []string{"10.0.1.10:8080", "10.0.1.10:9090", "[fd00::1:10]:8080", "[fd00::1:10]:9090"}; !slices.Equal(names, want) {
		t.Errorf("chains %v, want %v", names, want)
	}
	if pr := all.Listeners[0].FilterChains[2].FilterChainMatch.PrefixRanges[0]; pr.PrefixLen.GetValue() != 128 {
		t.Errorf("v6 prefix %v", pr)
	}
	// Server-side scope on node n2: api runs on n1, so nothing is steered.
	local := mustBuild(t, in, "n2", Options{LocalDestinationsOnly: true})
	if n := len(local.Listeners[0].FilterChains); n != 0 {
		t.Errorf("n2 local chains: %d", n)
	}
	if all.Version == local.Version {
		t.Error("different configurations share a version")
	}
}

func TestBuildNoRulesDeniesAll(t *testing.T) {
	in := shopInput(apiIP, 8080)
	in.Policies[0].Spec.Rules = nil
	r := mustBuild(t, in, "n1", Options{})
	_, rules := chainRBAC(t, r, 0)
	if rules.Action != rbacconfig.RBAC_ALLOW || len(rules.Policies) != 0 {
		t.Errorf("want ALLOW with no policy (deny all), got %v", rules)
	}
}

func TestBuildTwoPoliciesOnePod(t *testing.T) {
	in := shopInput(apiIP, 8080)
	second := in.Policies[0].DeepCopy()
	second.Name = "extra"
	second.Spec.Ports = []v1alpha1.L7PolicyPort{{Port: 8080}, {Port: 7070}}
	second.Spec.Rules = second.Spec.Rules[:1]
	in.Policies = append(in.Policies, second)
	r := mustBuild(t, in, "n1", Options{})
	if n := len(r.Listeners[0].FilterChains); n != 2 {
		t.Fatalf("chains %d", n)
	}
	// 7070 carries only extra's rule; 8080 the union of both policies.
	_, r7070 := chainRBAC(t, r, 0)
	_, r8080 := chainRBAC(t, r, 1)
	if len(r7070.Policies) != 1 || r7070.Policies["shop/extra/0"] == nil {
		t.Errorf("7070 policies %v", r7070.Policies)
	}
	if len(r8080.Policies) != 4 {
		t.Errorf("8080 policies %d, want 4", len(r8080.Policies))
	}
	if got := r.Destinations[1].L7Policies; !slices.Equal(got, []string{"shop/api", "shop/extra"}) {
		t.Errorf("8080 selected by %v", got)
	}
}

func TestBuildDeterministic(t *testing.T) {
	in := shopInput(apiIP, 8080)
	want := mustBuild(t, in, "n1", Options{}).Version
	for i := 0; i < 20; i++ {
		rand.Shuffle(len(in.Pods), func(a, b int) { in.Pods[a], in.Pods[b] = in.Pods[b], in.Pods[a] })
		if got := mustBuild(t, in, "n1", Options{}).Version; got != want {
			t.Fatalf("pod order changed the version: %s != %s", got, want)
		}
	}
}

func TestBuildRejectsInvalidPolicy(t *testing.T) {
	in := shopInput(apiIP, 8080)
	in.Policies[0].Spec.Rules[1].Path.Regex = ptr("/orders/(")
	_, err := Build(in, "n1", Options{})
	if err == nil || !strings.Contains(err.Error(), "spec.rules[1].path.regex") {
		t.Fatalf("want the field path in the error, got %v", err)
	}
}

func TestLintCatches(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(r *Resources)
		want   string
	}{
		{"router not last", func(r *Resources) {
			editHCM(r, func(m *hcm.HttpConnectionManager) {
				m.HttpFilters[0], m.HttpFilters[1] = m.HttpFilters[1], m.HttpFilters[0]
			})
		}, "the router must be the last filter"},
		{"type url mismatch", func(r *Resources) {
			editHCM(r, func(m *hcm.HttpConnectionManager) {
				m.HttpFilters[0].ConfigType = &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&router.Router{})}
			})
		}, "typed_config is type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, want"},
		{"bad regex", func(r *Resources) {
			editRBAC(r, func(rb *rbacconfig.RBAC) {
				rb.Policies["shop/api/1"].Permissions[0].GetAndRules().Rules[1].GetUrlPath().GetPath().MatchPattern = &matcher.StringMatcher_SafeRegex{SafeRegex: &matcher.RegexMatcher{Regex: "(?<!x)"}}
			})
		}, "regex \"(?<!x)\""},
		{"missing cluster", func(r *Resources) { r.Clusters = nil }, `cluster "kebpf_original_dst" does not exist`},
		{"original dst lb", func(r *Resources) { r.Clusters[0].LbPolicy = cluster.Cluster_ROUND_ROBIN }, "ORIGINAL_DST needs lb_policy CLUSTER_PROVIDED"},
		{"original dst endpoints", func(r *Resources) {
			r.Clusters[0].LoadAssignment = staticCluster("x", socketAddress(netip.MustParseAddrPort("1.2.3.4:5"))).LoadAssignment
		}, "must not have a load_assignment"},
		{"validate inside any", func(r *Resources) {
			editHCM(r, func(m *hcm.HttpConnectionManager) { m.StatPrefix = "" })
		}, "StatPrefix"},
		{"validate top level", func(r *Resources) { r.Clusters[0].ConnectTimeout = durationpb.New(-1) }, "ConnectTimeout"},
		{"default chain allows", func(r *Resources) {
			l := r.Listeners[0]
			l.DefaultFilterChain = proto.Clone(l.FilterChains[0]).(*listenerFilterChain)
			l.DefaultFilterChain.Name = DefaultChainName
		}, "the default chain must allow nothing"},
		{"no default chain", func(r *Resources) { r.Listeners[0].DefaultFilterChain = nil }, "no default_filter_chain"},
		{"rbac deny action", func(r *Resources) {
			editRBAC(r, func(rb *rbacconfig.RBAC) { rb.Action = rbacconfig.RBAC_DENY })
		}, "want ALLOW (default deny)"},
		{"duplicate chain", func(r *Resources) {
			l := r.Listeners[0]
			l.FilterChains = append(l.FilterChains, proto.Clone(l.FilterChains[0]).(*listenerFilterChain))
		}, "duplicate filter chain name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := mustBuild(t, shopInput(apiIP, 8080), "n1", Options{})
			tc.break_(r)
			err := Lint(r)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("want lint error containing %q, got %v", tc.want, err)
			}
		})
	}
}

func editHCM(r *Resources, f func(*hcm.HttpConnectionManager)) {
	fl := r.Listeners[0].FilterChains[0].Filters[0]
	var m hcm.HttpConnectionManager
	if err := fl.GetTypedConfig().UnmarshalTo(&m); err != nil {
		panic(err)
	}
	f(&m)
	fl.ConfigType = &listenerFilterTypedConfig{TypedConfig: mustAny(&m)}
}

func editRBAC(r *Resources, f func(*rbacconfig.RBAC)) {
	editHCM(r, func(m *hcm.HttpConnectionManager) {
		var rb rbacfilter.RBAC
		if err := m.HttpFilters[0].GetTypedConfig().UnmarshalTo(&rb); err != nil {
			panic(err)
		}
		f(rb.Rules)
		m.HttpFilters[0].ConfigType = &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&rb)}
	})
}

type (
	listenerFilterChain       = listener.FilterChain
	listenerFilterTypedConfig = listener.Filter_TypedConfig
)

func TestBuildAccessLogSocket(t *testing.T) {
	r := mustBuild(t, shopInput(apiIP, 8080), "n1", Options{AccessLogSocket: "/run/kubectl-ebpf/xds.sock"})
	var als *cluster.Cluster
	for _, c := range r.Clusters {
		if c.Name == ALSCluster {
			als = c
		}
	}
	if als == nil || als.LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetPipe().GetPath() != "/run/kubectl-ebpf/xds.sock" {
		t.Fatalf("ALS cluster %v", als)
	}
	m, _ := chainRBAC(t, r, 0)
	if len(m.AccessLog) != 1 || m.AccessLog[0].Name != "envoy.access_loggers.http_grpc" {
		t.Fatalf("access logs %v", m.AccessLog)
	}
	// The chain's constants travel as custom tags: the trace names the
	// L7Policy of a 403 that no rule matched by them.
	var g grpcal.HttpGrpcAccessLogConfig
	if err := m.AccessLog[0].GetTypedConfig().UnmarshalTo(&g); err != nil {
		t.Fatal(err)
	}
	tags := map[string]string{}
	for _, ct := range g.GetCommonConfig().GetCustomTags() {
		tags[ct.GetTag()] = ct.GetLiteral().GetValue()
	}
	if tags[ALSTagL7Policies] != "shop/api" || tags[ALSTagPod] != "shop/api" || len(tags) != 2 {
		t.Errorf("custom tags %v", tags)
	}
	r.Clusters = r.Clusters[:1]
	if err := Lint(r); err == nil || !strings.Contains(err.Error(), `ALS cluster "kebpf_als" does not exist`) {
		t.Fatalf("lint without the ALS cluster: %v", err)
	}
}
