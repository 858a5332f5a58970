package xds

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	xdsserver "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	cds = resource.ClusterType
	lds = resource.ListenerType
)

// startServer serves s on a unix socket and returns a client connection.
func startServer(t *testing.T, serve func(*grpc.Server)) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "xds.sock")
	lis, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	serve(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func ourServer(t *testing.T) (*Server, *grpc.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s := NewServer(ctx, ServerOptions{})
	conn := startServer(t, func(g *grpc.Server) { discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds) })
	return s, conn
}

// sotw is a scripted state-of-the-world ADS client.
type sotw struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
	resp   chan *discovery.DiscoveryResponse
	first  bool
}

func newSotw(t *testing.T, conn *grpc.ClientConn) *sotw {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &sotw{t: t, stream: st, cancel: cancel, resp: make(chan *discovery.DiscoveryResponse, 100000), first: true}
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				close(c.resp)
				return
			}
			c.resp <- r
		}
	}()
	t.Cleanup(cancel)
	return c
}

func (c *sotw) send(typeURL, version, nonce, nack string) {
	c.t.Helper()
	req := &discovery.DiscoveryRequest{TypeUrl: typeURL, VersionInfo: version, ResponseNonce: nonce}
	if c.first {
		req.Node = &core.Node{Id: "n1"}
		c.first = false
	}
	if nack != "" {
		req.ErrorDetail = &status.Status{Code: 3, Message: nack}
	}
	if err := c.stream.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

// recv waits for one response; nil when none comes within d.
func (c *sotw) recv(d time.Duration) *discovery.DiscoveryResponse {
	select {
	case r := <-c.resp:
		return r
	case <-time.After(d):
		return nil
	}
}

func (c *sotw) must(typeURL, version string) *discovery.DiscoveryResponse {
	c.t.Helper()
	r := c.recv(5 * time.Second)
	if r == nil {
		c.t.Fatalf("no %s response (want version %s)", typeURL, version)
	}
	if r.TypeUrl != typeURL || r.VersionInfo != version || r.Nonce == "" {
		c.t.Fatalf("got %s version %q nonce %q, want %s version %s", r.TypeUrl, r.VersionInfo, r.Nonce, typeURL, version)
	}
	for _, a := range r.Resources {
		if a.TypeUrl != typeURL {
			c.t.Fatalf("resource type %s in a %s response", a.TypeUrl, typeURL)
		}
	}
	return r
}

// none asserts that no response arrives within d.
func (c *sotw) none(d time.Duration, why string) {
	c.t.Helper()
	if r := c.recv(d); r != nil {
		c.t.Fatalf("%s: unexpected %s version %s", why, r.TypeUrl, r.VersionInfo)
	}
}

func builds(t *testing.T, ports ...int32) []*Resources {
	var out []*Resources
	for _, p := range ports {
		out = append(out, mustBuild(t, shopInput(apiIP, p), "n1", Options{}))
	}
	return out
}

func waitStatus(t *testing.T, s *Server, what string, ok func(NodeStatus) bool) NodeStatus {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := s.Status("n1")
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: status %+v", what, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSotwVersionsNoncesAckNackReconnect(t *testing.T) {
	s, conn := ourServer(t)
	ctx := context.Background()
	v := builds(t, 8080, 8081, 8082)
	if err := s.Update(ctx, "n1", v[0]); err != nil {
		t.Fatal(err)
	}
	c := newSotw(t, conn)
	c.send(cds, "", "", "")
	r := c.must(cds, v[0].Version)
	c.send(lds, "", "", "")
	l := c.must(lds, v[0].Version)
	if r.Nonce == l.Nonce {
		t.Fatal("two responses share a nonce")
	}
	c.send(cds, v[0].Version, r.Nonce, "")
	c.send(lds, v[0].Version, l.Nonce, "")
	st := waitStatus(t, s, "acked v0", NodeStatus.Programmed)
	if st.Streams != 1 || st.AckedVersion != v[0].Version {
		t.Fatalf("status %+v", st)
	}
	c.none(300*time.Millisecond, "after ACKs")

	// v1: both types are resent (state of the world: the version changed).
	if err := s.Update(ctx, "n1", v[1]); err != nil {
		t.Fatal(err)
	}
	got := map[string]*discovery.DiscoveryResponse{}
	for i := 0; i < 2; i++ {
		r := c.recv(5 * time.Second)
		if r == nil || r.VersionInfo != v[1].Version {
			t.Fatalf("want v1 responses, got %v", r)
		}
		got[r.TypeUrl] = r
	}
	// ACK the clusters, NACK the listener: the version Envoy still runs is v0.
	c.send(cds, v[1].Version, got[cds].Nonce, "")
	before := s.Status("n1").Responses
	c.send(lds, v[0].Version, got[lds].Nonce, "listener kebpf_l7: invalid (scripted)")
	// The rollback to v0 answers the open cluster watch once (its client
	// has v1); the listener gets nothing: its client already runs v0.
	back := c.must(cds, v[0].Version)
	c.send(cds, v[0].Version, back.Nonce, "")
	c.none(time.Second, "after a NACK")
	st = waitStatus(t, s, "nack recorded, v0 acked", func(st NodeStatus) bool {
		return st.NackedVersion == v[1].Version && st.AckedVersion == v[0].Version
	})
	if st.Message != "listener kebpf_l7: invalid (scripted)" || st.Version != v[1].Version || st.Programmed() {
		t.Fatalf("status %+v", st)
	}
	if n := st.Responses - before; n != 1 {
		t.Fatalf("%d responses after the NACK, want 1 (the rollback of the other type)", n)
	}
	t.Logf("responses in 1 s after a NACK: %d (the rollback of CDS; 0 for the NACKed LDS)", st.Responses-before)

	// The rejected version is never set again.
	if err := s.Update(ctx, "n1", v[1]); !errors.Is(err, ErrRejected) {
		t.Fatalf("Update with the rejected version: %v, want ErrRejected", err)
	}
	c.none(300*time.Millisecond, "rejected version set again")

	// A new version goes out once per type and clears the NACK once ACKed.
	if err := s.Update(ctx, "n1", v[2]); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		r := c.recv(5 * time.Second)
		if r == nil || r.VersionInfo != v[2].Version {
			t.Fatalf("want v2, got %v", r)
		}
		c.send(r.TypeUrl, r.VersionInfo, r.Nonce, "")
	}
	waitStatus(t, s, "v2 acked, nack cleared", func(st NodeStatus) bool {
		return st.AckedVersion == v[2].Version && st.NackedVersion == "" && st.Message == ""
	})

	// Reconnect: a restarted Envoy (no version) gets v2. One that kept its
	// config (version v2) gets v2 once as well: go-control-plane v0.14 keys
	// what a client has on the stream's returned resources, which a new
	// stream does not have. Harmless (Envoy ACKs the same config); then quiet.
	c.cancel()
	waitStatus(t, s, "stream closed", func(st NodeStatus) bool { return st.Streams == 0 })
	fresh := newSotw(t, conn)
	fresh.send(cds, "", "", "")
	fresh.must(cds, v[2].Version)
	kept := newSotw(t, conn)
	kept.send(lds, v[2].Version, "", "")
	again := kept.must(lds, v[2].Version)
	kept.send(lds, v[2].Version, again.Nonce, "")
	kept.none(300*time.Millisecond, "reconnect with the current version, ACKed")
	waitStatus(t, s, "two streams", func(st NodeStatus) bool { return st.Streams == 2 })
}

func TestSotwFirstVersionNacked(t *testing.T) {
	s, conn := ourServer(t)
	v := builds(t, 8080, 8081)
	if err := s.Update(context.Background(), "n1", v[0]); err != nil {
		t.Fatal(err)
	}
	c := newSotw(t, conn)
	c.send(lds, "", "", "")
	r := c.must(lds, v[0].Version)
	c.send(lds, "", r.Nonce, "bad")
	c.none(time.Second, "NACK of the first version")
	st := s.Status("n1")
	if st.NackedVersion != v[0].Version || st.Version != v[0].Version || st.AckedVersion != "" || st.Programmed() {
		t.Fatalf("status %+v", st)
	}
	if err := s.Update(context.Background(), "n1", v[1]); err != nil {
		t.Fatal(err)
	}
	c.must(lds, v[1].Version)
}

// nackLoop subscribes to LDS, ACKs the first version, then NACKs every
// response for d after setting a second version, and returns how many
// responses carried the rejected version.
func nackLoop(t *testing.T, conn *grpc.ClientConn, set func(*Resources) error, d time.Duration) int {
	t.Helper()
	v := builds(t, 8080, 8081)
	if err := set(v[0]); err != nil {
		t.Fatal(err)
	}
	c := newSotw(t, conn)
	c.send(lds, "", "", "")
	r := c.must(lds, v[0].Version)
	c.send(lds, v[0].Version, r.Nonce, "")
	c.none(200*time.Millisecond, "after ACK")
	if err := set(v[1]); err != nil {
		t.Fatal(err)
	}
	n := 0
	deadline := time.After(d)
	for {
		select {
		case r, ok := <-c.resp:
			if !ok {
				t.Fatal("stream ended")
			}
			if r.VersionInfo == v[1].Version {
				n++
			}
			c.send(lds, v[0].Version, r.Nonce, "rejected by the test")
		case <-deadline:
			return n
		}
	}
}

// TestNackLoopMeasured measures responses per NACK: go-control-plane's
// snapshot cache alone (the loop XDS-FACTS.md measured) and our Server.
func TestNackLoopMeasured(t *testing.T) {
	if testing.Short() {
		t.Skip("a 2 s measurement that spins the bare cache's NACK loop; not run under -short")
	}
	const d = time.Second
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	raw := cache.NewSnapshotCache(true, cache.IDHash{}, nil)
	rawConn := startServer(t, func(g *grpc.Server) {
		discovery.RegisterAggregatedDiscoveryServiceServer(g, xdsserver.NewServer(ctx, raw, nil))
	})
	rawN := nackLoop(t, rawConn, func(r *Resources) error {
		snap, err := r.Snapshot()
		if err != nil {
			return err
		}
		return raw.SetSnapshot(ctx, "n1", snap)
	}, d)

	s, conn := ourServer(t)
	ourN := nackLoop(t, conn, func(r *Resources) error { return s.Update(ctx, "n1", r) }, d)
	t.Logf("responses carrying the rejected version in %s: go-control-plane cache alone %d, our Server %d", d, rawN, ourN)
	if ourN != 1 {
		t.Errorf("our server sent the rejected version %d times, want 1", ourN)
	}
	if rawN < 10 {
		t.Logf("note: the bare cache no longer loops (%d); the upstream bug may be fixed", rawN)
	}
}

// delta is a scripted incremental ADS client.
type delta struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	resp   chan *discovery.DeltaDiscoveryResponse
	first  bool
}

func newDelta(t *testing.T, conn *grpc.ClientConn) *delta {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &delta{t: t, stream: st, resp: make(chan *discovery.DeltaDiscoveryResponse, 1000), first: true}
	go func() {
		for {
			r, err := st.Recv()
			if err != nil {
				close(c.resp)
				return
			}
			c.resp <- r
		}
	}()
	return c
}

func (c *delta) send(req *discovery.DeltaDiscoveryRequest) {
	c.t.Helper()
	if c.first {
		req.Node = &core.Node{Id: "n1"}
		c.first = false
	}
	if err := c.stream.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

func (c *delta) recv(d time.Duration) *discovery.DeltaDiscoveryResponse {
	select {
	case r := <-c.resp:
		return r
	case <-time.After(d):
		return nil
	}
}

func TestDeltaAckNack(t *testing.T) {
	s, conn := ourServer(t)
	ctx := context.Background()
	v := builds(t, 8080, 8081, 8082)
	if err := s.Update(ctx, "n1", v[0]); err != nil {
		t.Fatal(err)
	}
	c := newDelta(t, conn)
	for _, typ := range []string{cds, lds} {
		c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: typ})
		r := c.recv(5 * time.Second)
		if r == nil || r.TypeUrl != typ || r.SystemVersionInfo != v[0].Version || len(r.Resources) != 1 {
			t.Fatalf("%s: got %v", typ, r)
		}
		c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: r.Nonce})
	}
	waitStatus(t, s, "delta v0 acked", NodeStatus.Programmed)

	// Only the listener changed: delta sends it alone.
	if err := s.Update(ctx, "n1", v[1]); err != nil {
		t.Fatal(err)
	}
	r := c.recv(5 * time.Second)
	if r == nil || r.TypeUrl != lds || r.Resources[0].Name != ListenerName {
		t.Fatalf("want the v1 listener, got %v", r)
	}
	before := s.Status("n1").Responses
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: lds, ResponseNonce: r.Nonce, ErrorDetail: &status.Status{Code: 3, Message: "delta says no"}})
	// Rolled back: the v0 listener once, which the client ACKs; then quiet.
	back := c.recv(5 * time.Second)
	if back == nil || back.TypeUrl != lds || back.SystemVersionInfo != v[0].Version {
		t.Fatalf("want the v0 listener back, got %v", back)
	}
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: lds, ResponseNonce: back.Nonce})
	if r := c.recv(time.Second); r != nil {
		t.Fatalf("after the NACK: unexpected %s %s", r.TypeUrl, r.SystemVersionInfo)
	}
	st := waitStatus(t, s, "delta nack", func(st NodeStatus) bool {
		return st.NackedVersion == v[1].Version && st.AckedVersion == v[0].Version && !st.Programmed()
	})
	if st.Message != "delta says no" || st.Responses-before != 1 {
		t.Fatalf("status %+v, responses after NACK %d", st, st.Responses-before)
	}
	if err := s.Update(ctx, "n1", v[1]); !errors.Is(err, ErrRejected) {
		t.Fatalf("rejected version set again: %v", err)
	}
	if err := s.Update(ctx, "n1", v[2]); err != nil {
		t.Fatal(err)
	}
	r = c.recv(5 * time.Second)
	if r == nil || r.SystemVersionInfo != v[2].Version {
		t.Fatalf("want v2, got %v", r)
	}
	c.send(&discovery.DeltaDiscoveryRequest{TypeUrl: lds, ResponseNonce: r.Nonce})
	waitStatus(t, s, "delta v2", func(st NodeStatus) bool { return st.AckedVersion == v[2].Version && st.NackedVersion == "" })
}

func TestPolicyStatusFollowsAckAndNack(t *testing.T) {
	s, conn := ourServer(t)
	ctx := context.Background()
	gen := func(g int64, port int32) *Resources {
		in := shopInput(apiIP, port)
		in.Policies[0].Generation = g
		return mustBuild(t, in, "n1", Options{})
	}
	v1, v2 := gen(1, 8080), gen(2, 8081)
	if v1.Policies["shop/api"] != 1 || len(v1.Policies) != 1 {
		t.Fatalf("Resources.Policies %v", v1.Policies)
	}
	if err := s.Update(ctx, "n1", v1); err != nil {
		t.Fatal(err)
	}
	if st, ok := s.PolicyStatus("n1", "shop/api", 1); !ok || st.Programmed != metav1.ConditionUnknown {
		t.Fatalf("before any ACK: %+v %v", st, ok)
	}
	c := newSotw(t, conn)
	c.send(cds, "", "", "")
	r := c.must(cds, v1.Version)
	c.send(lds, "", "", "")
	l := c.must(lds, v1.Version)
	c.send(cds, v1.Version, r.Nonce, "")
	c.send(lds, v1.Version, l.Nonce, "")
	waitStatus(t, s, "v1 acked", NodeStatus.Programmed)
	if st, ok := s.PolicyStatus("n1", "shop/api", 1); !ok || st.Programmed != metav1.ConditionTrue || st.AckedVersion != v1.Version {
		t.Fatalf("after ACK: %+v %v", st, ok)
	}
	if _, ok := s.PolicyStatus("n1", "shop/other", 1); ok {
		t.Fatal("a policy no version carries has a node entry")
	}

	if err := s.Update(ctx, "n1", v2); err != nil {
		t.Fatal(err)
	}
	if st, ok := s.PolicyStatus("n1", "shop/api", 2); !ok || st.Programmed != metav1.ConditionUnknown {
		t.Fatalf("generation 2 pending: %+v %v", st, ok)
	}
	got := map[string]*discovery.DiscoveryResponse{}
	for i := 0; i < 2; i++ {
		r := c.recv(5 * time.Second)
		if r == nil {
			t.Fatal("no v2 response")
		}
		got[r.TypeUrl] = r
	}
	c.send(lds, v1.Version, got[lds].Nonce, "bad listener")
	waitStatus(t, s, "v2 nacked", func(st NodeStatus) bool { return st.NackedVersion == v2.Version })
	st, ok := s.PolicyStatus("n1", "shop/api", 2)
	if !ok || st.Programmed != metav1.ConditionFalse || st.Message != "bad listener" || st.NackedVersion != v2.Version || st.AckedVersion != v1.Version {
		t.Fatalf("generation 2 after NACK: %+v %v", st, ok)
	}
}
