package xds

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	fileal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	grpcal "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tracing "github.com/envoyproxy/go-control-plane/envoy/type/tracing/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Names of the resources every snapshot carries. They are part of the
// contract with the agent (status, trace) and with Envoy's stats.
const (
	// ListenerName is the one listener the agent steers connections to.
	ListenerName = "kebpf_l7"
	// OriginalDstCluster forwards to the connection's original destination.
	OriginalDstCluster = "kebpf_original_dst"
	// upstreamOverrideCluster is Options.Upstream's static cluster.
	upstreamOverrideCluster = "kebpf_upstream_override"
	// ALSCluster reaches the access log service on Options.AccessLogSocket.
	ALSCluster = "kebpf_als"
	// ALSLogName is the log_name of our ALS entries.
	ALSLogName = "kebpf_l7"
	// RBACStatPrefix prefixes the RBAC filter's stats and metadata keys.
	rbacMetadataNamespace = "envoy.filters.http.rbac"
)

// What an ALS entry carries for the agent's trace (nodeagent/trace): the
// RBAC filter's dynamic metadata, and per filter chain two custom tags.
const (
	// RBACMetadataNamespace is the filter metadata key of the RBAC result:
	// RBACPolicyKey (the ns/name/rule that allowed, PolicyName) and
	// RBACResultKey ("allowed" or "denied").
	RBACMetadataNamespace = rbacMetadataNamespace
	RBACPolicyKey         = "enforced_effective_policy_id"
	RBACResultKey         = "enforced_engine_result"
	// ALSTagL7Policies: the L7Policies (ns/name, comma-separated) selecting
	// the chain's destination, i.e. what denied a 403 no rule matched.
	// Absent on the default chain.
	ALSTagL7Policies = "l7policies"
	// ALSTagPod: the destination pod's ns/name. Absent on the default chain.
	ALSTagPod = "pod"
)

// Pod is what the builder needs to know about a pod: where it is, what it is
// called and which labels selectors see.
type Pod struct {
	Namespace string
	Name      string
	Node      string
	Labels    map[string]string
	IPs       []netip.Addr
	// HostNetwork pods share the node's address: they can be neither a
	// steered destination nor told apart as a client, so they are skipped.
	HostNetwork bool
}

// Input is the cluster state a node's configuration is built from. Only
// Accepted policies (v1alpha1.ValidateL7Policy without errors) belong here;
// Build validates again and fails on an invalid one.
type Input struct {
	Policies []*v1alpha1.L7Policy
	Pods     []Pod
	// Namespaces maps a namespace name to its labels, for namespaceSelector.
	Namespaces map[string]map[string]string
}

// Options shape the Envoy configuration of every node.
type Options struct {
	// ListenAddress is where Envoy listens for steered connections;
	// default 127.0.0.1:15001.
	ListenAddress netip.AddrPort
	// AccessLogPath receives one JSON object per request (a file, a FIFO, or
	// /dev/stdout); empty disables the file access log.
	AccessLogPath string
	// AccessLogSocket, when set, also streams every request to the gRPC
	// access log service (ALS) on this unix socket: normally the agent's
	// xDS socket, where Server answers ALS when ServerOptions.OnAccessLog is
	// set. No network port either way.
	AccessLogSocket string
	// LocalDestinationsOnly keeps only destination pods running on the node
	// being built for (server-side enforcement). False: every selected pod in
	// the cluster gets a filter chain, since connect-time steering happens on
	// the client's node.
	LocalDestinationsOnly bool
	// Upstream, when valid, replaces the ORIGINAL_DST cluster in the route by
	// a static cluster pointing at this address. For tests and debugging
	// only: it lets a plain client reach the listener without SO_ORIGINAL_DST.
	// The ORIGINAL_DST cluster is still part of the snapshot.
	Upstream netip.AddrPort
}

func (o Options) listen() netip.AddrPort {
	if o.ListenAddress.IsValid() {
		return o.ListenAddress
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 15001)
}

// Resources is one node's Envoy configuration.
type Resources struct {
	Listeners []*listener.Listener
	Clusters  []*cluster.Cluster
	// Version is a hash of the content: the same configuration always gets
	// the same version, so rebuilding after an unrelated change sends nothing
	// and a version Envoy rejected is recognised when built again.
	Version string
	// Destinations are the pod:port filter chains, sorted, for status.
	Destinations []Destination
	// Policies maps namespace/name of every L7Policy that selects at least
	// one destination here to its metadata.generation: the node's status for
	// that policy follows the versions carrying this generation.
	Policies map[string]int64
}

// Destination is one steered pod:port and the RBAC policies guarding it.
type Destination struct {
	Addr       netip.AddrPort
	Pod        string   // namespace/name
	L7Policies []string // namespace/name of the L7Policies selecting it
	Policies   []string // RBAC policy names (PolicyName)
}

// PolicyName is the RBAC policy name of rule i of an L7Policy. It is what
// Envoy reports in RESPONSE_CODE_DETAILS and in the RBAC dynamic metadata,
// so the access log names the policy and rule that allowed a request.
func PolicyName(p *v1alpha1.L7Policy, rule int) string {
	return p.Namespace + "/" + p.Name + "/" + strconv.Itoa(rule)
}

// Build turns the cluster state into the Envoy configuration of one node. It
// is pure: same input, same output, same version.
func Build(in Input, node string, opts Options) (_ *Resources, err error) {
	// Packing a message panics only on input the validation should have
	// refused (e.g. invalid UTF-8): an error for the caller, never a crash
	// of the agent.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("build envoy config for node %s: %v", node, r)
		}
	}()
	dests := map[netip.AddrPort]*destination{}
	for _, p := range in.Policies {
		if errs := v1alpha1.ValidateL7Policy(p); len(errs) > 0 {
			return nil, fmt.Errorf("l7policy %s/%s: %w", p.Namespace, p.Name, errs.ToAggregate())
		}
		sel, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
		if err != nil {
			return nil, fmt.Errorf("l7policy %s/%s: %w", p.Namespace, p.Name, err)
		}
		policies, err := rbacPolicies(p, in)
		if err != nil {
			return nil, err
		}
		for _, pod := range in.Pods {
			if pod.HostNetwork || pod.Namespace != p.Namespace || !sel.Matches(labels.Set(pod.Labels)) {
				continue
			}
			if opts.LocalDestinationsOnly && pod.Node != node {
				continue
			}
			for _, ip := range pod.IPs {
				for _, port := range p.Spec.Ports {
					ap := netip.AddrPortFrom(ip.Unmap(), uint16(port.Port))
					d := dests[ap]
					if d == nil {
						d = &destination{addr: ap, pod: pod.Namespace + "/" + pod.Name, policies: map[string]*rbacPolicy{}}
						dests[ap] = d
					}
					for name, pol := range policies {
						d.policies[name] = pol
					}
					d.selectedBy = append(d.selectedBy, p.Namespace+"/"+p.Name)
				}
			}
		}
	}

	keys := make([]netip.AddrPort, 0, len(dests))
	for k := range dests {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b netip.AddrPort) int { return a.Compare(b) })

	upstream := OriginalDstCluster
	clusters := []*cluster.Cluster{originalDstCluster()}
	if opts.Upstream.IsValid() {
		upstream = upstreamOverrideCluster
		clusters = append(clusters, staticCluster(upstreamOverrideCluster, socketAddress(opts.Upstream)))
	}
	if opts.AccessLogSocket != "" {
		als := staticCluster(ALSCluster, pipe(opts.AccessLogSocket))
		als.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpOptionsKey: mustAny(http2Options())}
		clusters = append(clusters, als)
	}

	res := &Resources{Clusters: clusters, Policies: map[string]int64{}}
	for _, p := range in.Policies {
		for _, d := range dests {
			if slices.Contains(d.selectedBy, p.Namespace+"/"+p.Name) {
				res.Policies[p.Namespace+"/"+p.Name] = p.Generation
				break
			}
		}
	}
	var chains []*listener.FilterChain
	for _, k := range keys {
		d := dests[k]
		fc, err := filterChain(d, upstream, opts)
		if err != nil {
			return nil, err
		}
		chains = append(chains, fc)
		res.Destinations = append(res.Destinations, Destination{Addr: d.addr, Pod: d.pod, L7Policies: d.l7Policies(), Policies: d.policyNames()})
	}
	def, err := filterChain(&destination{policies: map[string]*rbacPolicy{}}, upstream, opts)
	if err != nil {
		return nil, err
	}
	res.Listeners = []*listener.Listener{mainListener(opts, chains, def)}
	v, err := version(res)
	if err != nil {
		return nil, err
	}
	res.Version = v
	return res, nil
}

type destination struct {
	addr     netip.AddrPort
	pod      string
	policies map[string]*rbacPolicy
	// selectedBy: namespace/name of every L7Policy selecting the pod:port,
	// including those without rules (which add no RBAC policy).
	selectedBy []string
}

// l7Policies are the namespace/name of the L7Policies selecting d.
func (d *destination) l7Policies() []string {
	seen := map[string]bool{}
	for _, n := range d.selectedBy {
		seen[n] = true
	}
	return sortedKeys(seen)
}

func (d *destination) policyNames() []string {
	names := make([]string, 0, len(d.policies))
	for n := range d.policies {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func mainListener(opts Options, chains []*listener.FilterChain, def *listener.FilterChain) *listener.Listener {
	la := opts.listen()
	return &listener.Listener{
		Name:    ListenerName,
		Address: socketAddress(la),
		// The agent rewrites connect() to this listener and answers
		// getsockopt(SO_ORIGINAL_DST) with the real pod:port; the filter
		// restores it as the local address, which the filter chains match.
		ListenerFilters: []*listener.ListenerFilter{{
			Name:       wellknown.OriginalDestination,
			ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: mustAny(&originaldst.OriginalDst{})},
		}},
		FilterChains: chains,
		// A connection whose original destination is no selected pod:port
		// is never steered; if one is (a race with a policy change), it
		// fails closed: every request gets 403 and is logged with an empty
		// l7policies. It also keeps the listener valid with no policy at
		// all (Envoy rejects a listener without any filter chain).
		DefaultFilterChain: def,
		// SO_REUSEPORT, set here rather than left to Envoy's default: while
		// the Envoy DaemonSet rolls, the new Envoy binds this address beside
		// the old one (manifests 50-envoy.yaml, maxSurge), the kernel spreads
		// steered connects over both, and the old one's listeners closing
		// after its drain leaves the new one taking every connection.
		EnableReusePort: wrapperspb.Bool(true),
	}
}

// DefaultChainName names the deny-all chain of unselected destinations.
const DefaultChainName = "unselected"

// filterChain makes the chain of one destination, or the default chain when
// d has no address.
func filterChain(d *destination, upstream string, opts Options) (*listener.FilterChain, error) {
	name, stat := DefaultChainName, DefaultChainName
	if d.addr.IsValid() {
		name, stat = d.addr.String(), statName(d.addr)
	}
	rbac := &rbacfilter.RBAC{Rules: rbacRules(d)}
	rt := &router.Router{}
	mgr := &hcm.HttpConnectionManager{
		CodecType:  hcm.HttpConnectionManager_AUTO,
		StatPrefix: stat,
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: "dest_" + stat,
			VirtualHosts: []*route.VirtualHost{{
				Name:    "any",
				Domains: []string{"*"},
				Routes: []*route.Route{{
					Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					Action: &route.Route_Route{Route: &route.RouteAction{
						ClusterSpecifier: &route.RouteAction_Cluster{Cluster: upstream},
						// Streams and uploads may be long: no per-route timeout.
						Timeout: durationpb.New(0),
					}},
				}},
			}},
		}},
		HttpFilters: []*hcm.HttpFilter{
			{Name: wellknown.HTTPRoleBasedAccessControl, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(rbac)}},
			// The router must be last: Envoy rejects a chain where it is not.
			{Name: wellknown.Router, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(rt)}},
		},
	}
	if opts.AccessLogPath != "" {
		al, err := accessLog(opts.AccessLogPath, d)
		if err != nil {
			return nil, err
		}
		mgr.AccessLog = append(mgr.AccessLog, al)
	}
	if opts.AccessLogSocket != "" {
		mgr.AccessLog = append(mgr.AccessLog, grpcAccessLog(d))
	}
	fc := &listener.FilterChain{
		Name: name,
		Filters: []*listener.Filter{{
			Name:       wellknown.HTTPConnectionManager,
			ConfigType: &listener.Filter_TypedConfig{TypedConfig: mustAny(mgr)},
		}},
	}
	if d.addr.IsValid() {
		fc.FilterChainMatch = &listener.FilterChainMatch{
			DestinationPort: wrapperspb.UInt32(uint32(d.addr.Port())),
			PrefixRanges:    []*core.CidrRange{{AddressPrefix: d.addr.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(d.addr.Addr().BitLen()))}},
		}
	}
	return fc, nil
}

// AccessLogFields is the JSON object Envoy writes per request. The agent's
// trace reader parses exactly these keys.
var AccessLogFields = map[string]string{
	"start_time":         "%START_TIME%",
	"node":               "%ENVIRONMENT(KEBPF_NODE)%",
	"method":             "%REQ(:METHOD)%",
	"path":               "%REQ(:PATH)%",
	"authority":          "%REQ(:AUTHORITY)%",
	"protocol":           "%PROTOCOL%",
	"response_code":      "%RESPONSE_CODE%",
	"response_details":   "%RESPONSE_CODE_DETAILS%",
	"rbac":               "%DYNAMIC_METADATA(" + rbacMetadataNamespace + ")%",
	"client":             "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
	"destination":        "%DOWNSTREAM_LOCAL_ADDRESS%",
	"filter_chain":       "%FILTER_CHAIN_NAME%",
	"upstream_host":      "%UPSTREAM_HOST%",
	"duration_ms":        "%DURATION%",
	"bytes_received":     "%BYTES_RECEIVED%",
	"bytes_sent":         "%BYTES_SENT%",
	"response_flags":     "%RESPONSE_FLAGS%",
	"upstream_transport": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}

func accessLog(path string, d *destination) (*accesslog.AccessLog, error) {
	fields := map[string]any{}
	for k, v := range AccessLogFields {
		fields[k] = v
	}
	// A denied request matched no RBAC policy (Envoy logs
	// rbac_access_denied_matched_policy[none]); what denied it is the set of
	// L7Policies selecting the destination, a constant of this filter chain.
	fields["l7policies"] = strings.Join(d.l7Policies(), ",")
	fields["pod"] = d.pod
	st, err := structpb.NewStruct(fields)
	if err != nil {
		return nil, fmt.Errorf("access log format: %w", err)
	}
	return &accesslog.AccessLog{
		Name: wellknown.FileAccessLog,
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: mustAny(&fileal.FileAccessLog{
			Path: path,
			AccessLogFormat: &fileal.FileAccessLog_LogFormat{LogFormat: &core.SubstitutionFormatString{
				Format: &core.SubstitutionFormatString_JsonFormat{JsonFormat: st},
			}},
		})},
	}, nil
}

// grpcAccessLog streams entries to ALSCluster. An entry carries the RBAC
// dynamic metadata, RESPONSE_CODE_DETAILS, the downstream addresses, and
// the chain's constants as custom tags (ALSTag*: what denied a 403 that no
// policy matched is the set of L7Policies selecting the destination).
func grpcAccessLog(d *destination) *accesslog.AccessLog {
	var tags []*tracing.CustomTag
	// Envoy refuses an empty literal: a tag is left out instead.
	for _, kv := range [][2]string{{ALSTagL7Policies, strings.Join(d.l7Policies(), ",")}, {ALSTagPod, d.pod}} {
		if kv[1] != "" {
			tags = append(tags, &tracing.CustomTag{Tag: kv[0],
				Type: &tracing.CustomTag_Literal_{Literal: &tracing.CustomTag_Literal{Value: kv[1]}}})
		}
	}
	return &accesslog.AccessLog{
		Name: wellknown.HTTPGRPCAccessLog,
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: mustAny(&grpcal.HttpGrpcAccessLogConfig{
			CommonConfig: &grpcal.CommonGrpcAccessLogConfig{
				LogName:             ALSLogName,
				TransportApiVersion: core.ApiVersion_V3,
				GrpcService: &core.GrpcService{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: ALSCluster},
				}},
				// Trace wants entries soon, not in 1 s batches.
				BufferFlushInterval: durationpb.New(100 * time.Millisecond),
				CustomTags:          tags,
			},
		})},
	}
}

func originalDstCluster() *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 OriginalDstCluster,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_ORIGINAL_DST},
		// ORIGINAL_DST requires CLUSTER_PROVIDED and no load_assignment.
		LbPolicy:        cluster.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:  durationpb.New(5 * time.Second),
		CleanupInterval: durationpb.New(30 * time.Second),
	}
}

func staticCluster(name string, addr *core.Address) *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LoadAssignment: &endpoint.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				LbEndpoints: []*endpoint.LbEndpoint{{
					HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: addr}},
				}},
			}},
		},
	}
}

func socketAddress(ap netip.AddrPort) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol:      core.SocketAddress_TCP,
		Address:       ap.Addr().String(),
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
	}}}
}

// statName makes a stats-safe name of a pod:port ("10.0.0.1_8080").
func statName(ap netip.AddrPort) string {
	r := strings.NewReplacer(".", "_", ":", "_", "[", "", "]", "")
	return r.Replace(ap.String())
}

// mustAny packs m deterministically: map fields (RBAC policies, the access
// log's JSON format) would otherwise serialise in random order and change
// the version hash, and the bytes Envoy compares, on every build.
func mustAny(m proto.Message) *anypb.Any {
	a := &anypb.Any{}
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		panic(fmt.Sprintf("marshal %T: %v", m, err)) // only on a programming error
	}
	return a
}

// version hashes the deterministic wire form of every resource.
func version(r *Resources) (string, error) {
	h := sha256.New()
	mo := proto.MarshalOptions{Deterministic: true}
	for _, m := range r.all() {
		b, err := mo.Marshal(m)
		if err != nil {
			return "", fmt.Errorf("hash %T: %w", m, err)
		}
		fmt.Fprintf(h, "%d:", len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func (r *Resources) all() []proto.Message {
	var out []proto.Message
	for _, c := range r.Clusters {
		out = append(out, c)
	}
	for _, l := range r.Listeners {
		out = append(out, l)
	}
	return out
}

// Snapshot wraps the resources for the cache and checks its consistency.
func (r *Resources) Snapshot() (*cache.Snapshot, error) {
	ls := make([]types.Resource, 0, len(r.Listeners))
	for _, l := range r.Listeners {
		ls = append(ls, l)
	}
	cs := make([]types.Resource, 0, len(r.Clusters))
	for _, c := range r.Clusters {
		cs = append(cs, c)
	}
	snap, err := cache.NewSnapshot(r.Version, map[resource.Type][]types.Resource{
		resource.ListenerType: ls,
		resource.ClusterType:  cs,
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", r.Version, err)
	}
	if err := snap.Consistent(); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", r.Version, err)
	}
	return snap, nil
}

func sortedKeys[K cmp.Ordered, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
