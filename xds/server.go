package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	alssvc "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	xdsserver "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// NodeStatus is what one node's Envoy did with our configuration: the agent
// copies it into NodeState and into each L7Policy's status.nodes.
type NodeStatus struct {
	Node string
	// Version is the version the builder made last, which the node should
	// run; after a NACK it stays the rejected one while the node runs (and
	// the cache serves) AckedVersion.
	Version string
	// AckedVersion is the last version the node ACKed on every resource type.
	AckedVersion string
	// NackedVersion and Message describe the last rejected version; both are
	// cleared when a newer version is ACKed.
	NackedVersion string
	Message       string
	// Streams is the number of open xDS streams from the node.
	Streams int
	// Responses counts the responses sent to the node (all types, all
	// streams): the NACK tests measure responses per NACK with it.
	Responses int
	Updated   time.Time
}

// Programmed is true when the node runs the version the server wants.
func (s NodeStatus) Programmed() bool { return s.Version != "" && s.AckedVersion == s.Version }

// ServerOptions configure a Server.
type ServerOptions struct {
	Logger *slog.Logger
	// OnStatus is called every time a node's status changes, with the
	// server's lock held (so calls are ordered): it must not block nor call
	// the Server. The agent hands the status to its sync loop.
	OnStatus func(NodeStatus)
	// OnAccessLog, when set, makes Serve answer Envoy's gRPC access log
	// service (Options.AccessLogSocket) on the same socket, and receives
	// every HTTP entry with the node id of the Envoy that sent it. Called
	// from the ALS stream's goroutine; it must not block for long.
	OnAccessLog func(node string, entry *alsdata.HTTPAccessLogEntry)
}

// Server serves ADS (state of the world and delta) from a snapshot cache
// keyed by node id (the Envoy's --service-node, our node name).
//
// NACK policy (go-control-plane v0.14 resends a rejected version at once, in
// a loop: 41,686 responses in 3 s, XDS-FACTS.md): when a node rejects the
// version in the cache, the cache goes back to the node's last version ACKed
// on every type (or is cleared when there is none). The NACK request carries
// the version the Envoy still runs, which is that last good one, so the cache
// has nothing newer to send: exactly one response per NACK. A rejected
// version is remembered and never set again for that node; the next
// different configuration is sent once.
type Server struct {
	cache cache.SnapshotCache
	xds   xdsserver.Server
	log   *slog.Logger
	opts  ServerOptions

	mu      sync.Mutex
	nodes   map[string]*nodeState
	streams map[int64]*streamState
	grpc    *grpc.Server
}

type nodeState struct {
	current  *cache.Snapshot // in the cache now; nil after a rollback with nothing good
	lastGood *cache.Snapshot
	rejected map[string]string      // version → Envoy's message
	acked    map[string]string      // type URL → version
	types    map[resource.Type]bool // types the node subscribed to
	status   NodeStatus
	// carried maps a version to the L7Policy generations it carries
	// (Resources.Policies), for the versions status can still refer to.
	carried map[string]map[string]int64
}

type streamState struct {
	node  string
	delta bool
	sent  map[string]string // nonce → version, for the responses not answered yet
}

// NewServer makes a server; Serve starts it.
func NewServer(ctx context.Context, opts ServerOptions) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		log:     opts.Logger,
		opts:    opts,
		nodes:   map[string]*nodeState{},
		streams: map[int64]*streamState{},
	}
	s.cache = cache.NewSnapshotCache(true, cache.IDHash{}, slogAdapter{opts.Logger})
	s.xds = xdsserver.NewServer(ctx, s.cache, xdsserver.CallbackFuncs{
		StreamOpenFunc:        func(_ context.Context, id int64, _ string) error { s.open(id, false); return nil },
		DeltaStreamOpenFunc:   func(_ context.Context, id int64, _ string) error { s.open(id, true); return nil },
		StreamClosedFunc:      func(id int64, _ *core.Node) { s.closed(id) },
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) { s.closed(id) },
		StreamRequestFunc:     s.onRequest,
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
			s.sent(id, r.GetNonce(), r.GetVersionInfo())
		},
		StreamDeltaRequestFunc: s.onDeltaRequest,
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, r *discovery.DeltaDiscoveryResponse) {
			s.sent(id, r.GetNonce(), r.GetSystemVersionInfo())
		},
	})
	return s
}

// ErrRejected is returned by Update for a version the node rejected before.
var ErrRejected = errors.New("version rejected before by the node's Envoy")

// Update sets the node's configuration. The resources must have been built
// by Build (Version set). A version the node rejected before is not sent
// again (ErrRejected, wrapped with Envoy's message); the node keeps its last
// good configuration.
func (s *Server) Update(ctx context.Context, node string, r *Resources) error {
	snap, err := r.Snapshot()
	if err != nil {
		return err
	}
	s.mu.Lock()
	ns := s.node(node)
	ns.carried[r.Version] = r.Policies
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		ns.prune()
		s.mu.Unlock()
	}()
	return s.set(ctx, node, r.Version, snap)
}

// set is Update for any snapshot whose every type carries version (tests
// feed the independent gRPC client a gRPC-shaped one through it).
func (s *Server) set(ctx context.Context, node, version string, snap *cache.Snapshot) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns := s.node(node)
	if ns.status.Version != version {
		ns.status.Version = version
		s.changed(ns)
	}
	if msg, ok := ns.rejected[version]; ok {
		return fmt.Errorf("node %s version %s: %w: %s", node, version, ErrRejected, msg)
	}
	if ns.current != nil && ns.current.GetVersion(resource.ListenerType) == version {
		return nil
	}
	if err := s.cache.SetSnapshot(ctx, node, snap); err != nil {
		return fmt.Errorf("set snapshot %s for %s: %w", version, node, err)
	}
	ns.current = snap
	s.log.Debug("xds snapshot set", "node", node, "version", version)
	return nil
}

// PolicyStatus is the node's entry for status.nodes of the L7Policy
// namespace/name at generation: Programmed True once the node ACKed a
// version carrying that generation, False with Envoy's message when the
// version carrying it was rejected, Unknown while it is on its way. ok is
// false when no version built for the node carries the policy (no selected
// pod there), so the agent leaves the node out of status.nodes.
func (s *Server) PolicyStatus(node, policy string, generation int64) (st v1alpha1.L7PolicyNodeStatus, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns := s.node(node)
	has := func(version string) bool {
		g, in := ns.carried[version][policy]
		return in && g == generation
	}
	st = v1alpha1.L7PolicyNodeStatus{
		Node:               node,
		ObservedGeneration: generation,
		AckedVersion:       ns.status.AckedVersion,
		Programmed:         metav1.ConditionUnknown,
	}
	switch {
	case has(ns.status.AckedVersion):
		st.Programmed = metav1.ConditionTrue
	case ns.status.NackedVersion != "" && has(ns.status.NackedVersion):
		st.Programmed = metav1.ConditionFalse
		st.NackedVersion, st.Message = ns.status.NackedVersion, ns.status.Message
	case !has(ns.status.Version):
		// The wanted version does not carry this generation: either the
		// policy selects nothing on this node, or a newer build is pending.
		if _, in := ns.carried[ns.status.Version][policy]; !in {
			return st, false
		}
	}
	return st, true
}

// Status returns the node's status.
func (s *Server) Status(node string) NodeStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.node(node).status
}

// Serve answers ADS on lis until Stop. For the agent, lis is a unix socket
// (ListenUnix): the node gets no network port.
func (s *Server) Serve(lis net.Listener) error {
	g := grpc.NewServer(
		grpc.MaxConcurrentStreams(1000),
		// Envoy keeps the ADS stream open for its lifetime; pings find dead peers.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	discovery.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	if s.opts.OnAccessLog != nil {
		alssvc.RegisterAccessLogServiceServer(g, alsServer{on: s.opts.OnAccessLog})
	}
	s.mu.Lock()
	s.grpc = g
	s.mu.Unlock()
	return g.Serve(lis)
}

// Stop closes the listener and every stream.
func (s *Server) Stop() {
	s.mu.Lock()
	g := s.grpc
	s.mu.Unlock()
	if g != nil {
		g.Stop()
	}
}

// ListenUnix listens on a unix socket at path, replacing a stale one left by
// a previous run. Mode 0660: Envoy runs in its own pod and reaches the socket
// through a hostPath; access is by file permission, not by a network port.
func ListenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("xds socket dir: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale xds socket: %w", err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		lis.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return lis, nil
}

func (s *Server) node(name string) *nodeState {
	ns := s.nodes[name]
	if ns == nil {
		ns = &nodeState{
			rejected: map[string]string{},
			acked:    map[string]string{},
			types:    map[resource.Type]bool{},
			status:   NodeStatus{Node: name},
			carried:  map[string]map[string]int64{},
		}
		s.nodes[name] = ns
	}
	return ns
}

// prune forgets what versions carried, except those the status names.
func (ns *nodeState) prune() {
	for v := range ns.carried {
		if v != ns.status.Version && v != ns.status.AckedVersion && v != ns.status.NackedVersion {
			delete(ns.carried, v)
		}
	}
}

func (s *Server) open(id int64, delta bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.streams[id] = &streamState{delta: delta, sent: map[string]string{}}
}

func (s *Server) closed(id int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	delete(s.streams, id)
	if st != nil && st.node != "" {
		ns := s.node(st.node)
		ns.status.Streams--
		s.changed(ns)
	}
}

func (s *Server) sent(id int64, nonce, version string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[id]; st != nil {
		st.sent[nonce] = version
		if st.node != "" {
			s.node(st.node).status.Responses++
		}
	}
}

func (s *Server) onRequest(id int64, req *discovery.DiscoveryRequest) error {
	// On a NACK, version_info is the version the Envoy still runs; the
	// rejected one is the version of the response the nonce answers.
	s.handle(id, req.GetNode(), req.GetTypeUrl(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil)
	return nil
}

func (s *Server) onDeltaRequest(id int64, req *discovery.DeltaDiscoveryRequest) error {
	s.handle(id, req.GetNode(), req.GetTypeUrl(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil)
	return nil
}

func (s *Server) handle(id int64, node *core.Node, typeURL, nonce, msg string, nack bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[id]
	if st == nil {
		return
	}
	if st.node == "" && node.GetId() != "" {
		st.node = node.GetId()
		ns := s.node(st.node)
		ns.status.Streams++
		s.changed(ns)
	}
	if st.node == "" {
		return
	}
	ns := s.node(st.node)
	ns.types[typeURL] = true
	if nonce == "" {
		return // a subscription, not an answer
	}
	version, ok := st.sent[nonce]
	delete(st.sent, nonce)
	if !ok {
		return // stale nonce: the server ignores that request too
	}
	if nack {
		s.nack(ns, typeURL, version, msg)
		return
	}
	ns.acked[typeURL] = version
	if ns.current == nil || ns.current.GetVersion(resource.ListenerType) != version {
		return
	}
	if st.delta {
		// Delta sends only the types whose resources changed: the node runs
		// the version once every response sent on the stream is ACKed.
		if len(st.sent) > 0 {
			return
		}
	} else {
		for t := range ns.types {
			if ns.acked[t] != version {
				return
			}
		}
	}
	ns.lastGood = ns.current
	if ns.status.AckedVersion == version {
		return
	}
	ns.status.AckedVersion = version
	ns.prune()
	if version == ns.status.Version {
		// The node runs what the builder wants: an older NACK is history.
		ns.status.NackedVersion, ns.status.Message = "", ""
	}
	s.log.Info("xds version acked", "node", st.node, "version", version)
	s.changed(ns)
}

// nack runs in the stream's goroutine before the server creates the watch
// for the NACK request, so the rollback is in the cache by then.
func (s *Server) nack(ns *nodeState, typeURL, version, msg string) {
	s.log.Warn("xds version rejected", "node", ns.status.Node, "type", typeURL, "version", version, "error", msg)
	ns.rejected[version] = msg
	ns.status.NackedVersion, ns.status.Message = version, msg
	s.changed(ns)
	if ns.current == nil || ns.current.GetVersion(resource.ListenerType) != version {
		return // already replaced by a newer version or rolled back
	}
	if ns.lastGood != nil {
		// SetSnapshot answers the open watches of the node's other types; the
		// stream's response channels are buffered one per type, so this cannot
		// block on the goroutine that called us.
		if err := s.cache.SetSnapshot(context.Background(), ns.status.Node, ns.lastGood); err != nil {
			s.log.Error("xds rollback", "node", ns.status.Node, "error", err)
		}
		ns.current = ns.lastGood
		return
	}
	s.cache.ClearSnapshot(ns.status.Node)
	ns.current = nil
}

func (s *Server) changed(ns *nodeState) {
	ns.status.Updated = time.Now()
	if s.opts.OnStatus != nil {
		s.opts.OnStatus(ns.status)
	}
}

// alsServer receives Envoy's access log stream. The node id comes in the
// stream's first message only.
type alsServer struct {
	alssvc.UnimplementedAccessLogServiceServer
	on func(string, *alsdata.HTTPAccessLogEntry)
}

func (a alsServer) StreamAccessLogs(stream grpc.ClientStreamingServer[alssvc.StreamAccessLogsMessage, alssvc.StreamAccessLogsResponse]) error {
	node := ""
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&alssvc.StreamAccessLogsResponse{})
		}
		if err != nil {
			return err
		}
		if id := msg.GetIdentifier().GetNode().GetId(); id != "" {
			node = id
		}
		for _, e := range msg.GetHttpLogs().GetLogEntry() {
			a.on(node, e)
		}
	}
}

// slogAdapter gives go-control-plane's logger interface to slog; its Info
// level is chatty per request, so it goes to Debug.
type slogAdapter struct{ l *slog.Logger }

func (a slogAdapter) Debugf(f string, args ...any) { a.l.Debug(fmt.Sprintf(f, args...)) }
func (a slogAdapter) Infof(f string, args ...any)  { a.l.Debug(fmt.Sprintf(f, args...)) }
func (a slogAdapter) Warnf(f string, args ...any)  { a.l.Warn(fmt.Sprintf(f, args...)) }
func (a slogAdapter) Errorf(f string, args ...any) { a.l.Error(fmt.Sprintf(f, args...)) }
