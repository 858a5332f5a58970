package xds

import (
	"fmt"
	"time"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	httpopts "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// xdsCluster is the bootstrap's static cluster that reaches our server.
const xdsCluster = "kebpf_xds"

// BootstrapOptions describe one node's Envoy.
type BootstrapOptions struct {
	// Node is the node name: Envoy's node id, the key of its snapshot.
	Node string
	// XDSSocket is the unix socket the agent's Server listens on.
	XDSSocket string
	// AdminSocket is a unix socket for Envoy's admin API (no TCP port);
	// empty disables the admin API.
	AdminSocket string
	// Delta selects incremental xDS (DELTA_GRPC) instead of state of the world.
	Delta bool
}

// Bootstrap is the JSON Envoy starts with (envoy -c bootstrap.json): the node
// id and ADS over a unix socket; everything else comes from the Server.
func Bootstrap(o BootstrapOptions) ([]byte, error) {
	if o.Node == "" || o.XDSSocket == "" {
		return nil, fmt.Errorf("bootstrap: node and xds socket are required")
	}
	apiType := core.ApiConfigSource_GRPC
	if o.Delta {
		apiType = core.ApiConfigSource_DELTA_GRPC
	}
	h2, err := anypb.New(http2Options())
	if err != nil {
		return nil, err
	}
	ads := &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
	b := &bootstrap.Bootstrap{
		Node: &core.Node{Id: o.Node, Cluster: "kubectl-ebpf"},
		DynamicResources: &bootstrap.Bootstrap_DynamicResources{
			AdsConfig: &core.ApiConfigSource{
				ApiType:                   apiType,
				TransportApiVersion:       core.ApiVersion_V3,
				SetNodeOnFirstMessageOnly: true,
				GrpcServices: []*core.GrpcService{{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: xdsCluster},
				}}},
			},
			CdsConfig: ads,
			LdsConfig: ads,
		},
		StaticResources: &bootstrap.Bootstrap_StaticResources{Clusters: []*cluster.Cluster{{
			Name:                          xdsCluster,
			ClusterDiscoveryType:          &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
			ConnectTimeout:                durationpb.New(time.Second),
			TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsKey: h2},
			LoadAssignment: &endpoint.ClusterLoadAssignment{
				ClusterName: xdsCluster,
				Endpoints: []*endpoint.LocalityLbEndpoints{{LbEndpoints: []*endpoint.LbEndpoint{{
					HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{Address: pipe(o.XDSSocket)}},
				}}}},
			},
		}}},
	}
	if o.AdminSocket != "" {
		b.Admin = &bootstrap.Admin{Address: pipe(o.AdminSocket)}
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	return protojson.MarshalOptions{Multiline: true}.Marshal(b)
}

const httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

// http2Options: gRPC clusters (xDS, ALS) speak HTTP/2.
func http2Options() *httpopts.HttpProtocolOptions {
	return &httpopts.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpopts.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
		}},
	}
}

func pipe(path string) *core.Address {
	return &core.Address{Address: &core.Address_Pipe{Pipe: &core.Pipe{Path: path}}}
}
