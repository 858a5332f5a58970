package xds

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// grpcShaped is a configuration grpc-go's xDS client accepts: an API
// listener routing to an EDS cluster with one endpoint.
func grpcShaped(t *testing.T, version string, backend netip.AddrPort) *cache.Snapshot {
	t.Helper()
	mgr := &hcm.HttpConnectionManager{
		StatPrefix: "grpc",
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: "grpc_routes",
			VirtualHosts: []*route.VirtualHost{{Name: "any", Domains: []string{"*"}, Routes: []*route.Route{{
				Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: "backend"}}},
			}}}},
		}},
		HttpFilters: []*hcm.HttpFilter{{Name: wellknown.Router, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: mustAny(&router.Router{})}}},
	}
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ListenerType: {&listener.Listener{Name: ListenerName, ApiListener: &listener.ApiListener{ApiListener: mustAny(mgr)}}},
		resource.ClusterType: {&cluster.Cluster{
			Name:                 "backend",
			ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
			EdsClusterConfig: &cluster.Cluster_EdsClusterConfig{EdsConfig: &core.ConfigSource{
				ResourceApiVersion:    core.ApiVersion_V3,
				ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
			}},
		}},
		resource.EndpointType: {&endpoint.ClusterLoadAssignment{
			ClusterName: "backend",
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				Locality:            &core.Locality{Region: "node"},
				LoadBalancingWeight: wrapperspb.UInt32(1),
				LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{
					Endpoint: &endpoint.Endpoint{Address: socketAddress(backend)},
				}}},
			}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Consistent(); err != nil {
		t.Fatal(err)
	}
	return snap
}

// TestGRPCClientAgainstServer drives our Server with an xDS client we did
// not write: grpc-go's (state of the world; XDS-FACTS.md). It NACKs the
// Envoy-shaped listener (gRPC needs an API listener; a gRPC limit, not Envoy
// invalidity), which shows NACK handling with a real independent client:
// one response, its error text in the status. Then a gRPC-shaped version
// is ACKed on LDS, CDS and EDS and carries real RPCs, also after a reconnect.
func TestGRPCClientAgainstServer(t *testing.T) {
	ctx := context.Background()
	const node = "grpc-n1"
	srv := NewServer(ctx, ServerOptions{})
	sock := filepath.Join(t.TempDir(), "xds.sock")
	lis, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)

	backend := grpc.NewServer()
	healthpb.RegisterHealthServer(backend, health.NewServer())
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go backend.Serve(bl)
	t.Cleanup(backend.Stop)

	resolver, err := xds.NewXDSResolverWithConfigForTesting([]byte(fmt.Sprintf(`{
		"xds_servers": [{"server_uri": "unix://%s", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		"node": {"id": %q}
	}`, sock, node)))
	if err != nil {
		t.Fatal(err)
	}
	dial := func() *grpc.ClientConn {
		c, err := grpc.NewClient("xds:///"+ListenerName, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(resolver))
		if err != nil {
			t.Fatal(err)
		}
		c.Connect()
		return c
	}
	check := func(c *grpc.ClientConn, d time.Duration) error {
		cctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		_, err := healthpb.NewHealthClient(c).Check(cctx, &healthpb.HealthCheckRequest{})
		return err
	}

	envoyShaped := mustBuild(t, shopInput(apiIP, 8080), node, Options{})
	if err := srv.Update(ctx, node, envoyShaped); err != nil {
		t.Fatal(err)
	}
	c := dial()
	if err := check(c, 2*time.Second); err == nil {
		t.Fatal("RPC succeeded over a listener gRPC cannot use")
	}
	st := waitNode(t, srv, node, "grpc client NACKs", func(st NodeStatus) bool { return st.NackedVersion == envoyShaped.Version })
	time.Sleep(time.Second)
	st = srv.Status(node)
	t.Logf("grpc-go NACK: %s", st.Message)
	t.Logf("responses to the grpc-go client in the 1 s after its NACK and before: %d", st.Responses)
	if st.Responses != 1 || st.Message == "" || st.AckedVersion != "" {
		t.Fatalf("status %+v", st)
	}

	backendAddr := netip.MustParseAddrPort(bl.Addr().String())
	if err := srv.set(ctx, node, "grpc-v2", grpcShaped(t, "grpc-v2", backendAddr)); err != nil {
		t.Fatal(err)
	}
	waitNode(t, srv, node, "grpc client ACKs LDS, CDS and EDS", NodeStatus.Programmed)
	if err := check(c, 5*time.Second); err != nil {
		t.Fatalf("RPC through the xDS-configured channel: %v", err)
	}
	c.Close()

	// Reconnect: a new channel gets the current version and works.
	c2 := dial()
	defer c2.Close()
	if err := check(c2, 5*time.Second); err != nil {
		t.Fatalf("RPC after reconnect: %v", err)
	}
	st = srv.Status(node)
	if !st.Programmed() || st.NackedVersion != "" || !strings.HasPrefix(st.AckedVersion, "grpc-v2") {
		t.Fatalf("status after reconnect %+v", st)
	}
}

func waitNode(t *testing.T, s *Server, node, what string, ok func(NodeStatus) bool) NodeStatus {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := s.Status(node)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: status %+v", what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
