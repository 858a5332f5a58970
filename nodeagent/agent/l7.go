//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/l7"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

func init() {
	register(Registration{
		Name: apiv1.FeatureL7,
		Kernel: func(*Config) []string {
			return []string{features.BPFSyscall, features.CgroupV2, features.ProgCgroupSockAddr, features.LinkCgroup,
				features.ProgSockOps, features.ProgSkMsg, features.ProgCgroupSockopt, features.MapSockHash, features.MapLRUHash,
				features.MapRingBuf, features.HelperSockHashUpdate, features.HelperMsgRedirectHash}
		},
		NeedsAPI: true, // L7Policies, pods, the node
		New:      func(a *Agent, _ prometheus.Registerer) Feature { return newL7Feature(a) },
	})
}

// L7Config configures the l7 feature.
type L7Config struct {
	// XDSSocket is the unix socket the node's Envoy reaches the xDS server
	// at (a hostPath both pods mount at the same path); default
	// manifests.EnvoyXDSSocket.
	XDSSocket string
	// AccessLogPath is given to Envoy for its JSON access log; default
	// /dev/stdout (the Envoy pod's log).
	AccessLogPath string
}

// l7Feature is L7 steering: the sockmap programs, the xDS server the
// node's Envoy connects to, and the sync programming both.
type l7Feature struct {
	syncedFeature
	a *Agent
}

func newL7Feature(a *Agent) *l7Feature {
	f := &l7Feature{a: a}
	f.syncedFeature = syncedFeature{name: apiv1.FeatureL7, log: a.log,
		detachPinned: func() error { return sockmap.DetachPinned(a.cfg.PinDir) }}
	return f
}

func (f *l7Feature) Name() string { return apiv1.FeatureL7 }

func (f *l7Feature) socket() string {
	if f.a.cfg.L7.XDSSocket != "" {
		return f.a.cfg.L7.XDSSocket
	}
	return manifests.EnvoyXDSSocket
}

func (f *l7Feature) Enable(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running() {
		return nil
	}
	if f.a.cfg.Client == nil {
		return errors.New("l7 needs the API client (L7Policy status)")
	}
	objs, err := sockmap.Load(f.a.cfg.PinDir)
	if err != nil {
		return err
	}
	// Attach keeps steering as it was pinned (an agent restart changes
	// nothing for live connections); fresh maps steer nothing yet.
	if err := objs.Attach(f.a.cfg.CgroupRoot); err != nil {
		objs.Close()
		return err
	}
	var syncer *l7.Syncer
	srv := xds.NewServer(ctx, xds.ServerOptions{
		Logger: f.a.log.With("feature", apiv1.FeatureL7),
		// ACKs and NACKs change status and may turn steering on.
		OnStatus: func(xds.NodeStatus) {
			if syncer != nil {
				syncer.Request()
			}
		},
		// Envoy's access log entries (gRPC ALS on this same socket): one
		// l7 trace event per request. Only this node's Envoy reaches it.
		OnAccessLog: func(_ string, e *alsdata.HTTPAccessLogEntry) {
			f.a.trace.Publish(trace.L7RequestEvent(e, f.a.cfg.NodeName, f.a.pods))
		},
	})
	sock := f.socket()
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		objs.Close()
		return fmt.Errorf("xds socket dir: %w", err)
	}
	lis, err := xds.ListenUnix(sock)
	if err != nil {
		objs.Close()
		return err
	}
	accessLog := f.a.cfg.L7.AccessLogPath
	if accessLog == "" {
		accessLog = "/dev/stdout"
	}
	syncer, err = l7.New(l7.Options{
		Base:       f.a.syncBase(apiv1.FeatureL7, f.a.cfg.L7Sync),
		API:        f.a.cfg.Client,
		Datapath:   sockmapDatapath{objs},
		Server:     srv,
		Namespace:  f.a.cfg.ConfigNamespace,
		CgroupRoot: f.a.cfg.CgroupRoot,
		// The xDS socket is at the same path in Envoy's pod (hostPath).
		XDS: xds.Options{AccessLogPath: accessLog, AccessLogSocket: sock},
	})
	if err != nil {
		lis.Close()
		objs.Close()
		return err
	}
	go func() {
		if err := srv.Serve(lis); err != nil {
			f.a.log.Error("xds server", "err", err)
		}
	}()
	lo := &l7Objects{objs: objs, srv: srv, sock: sock}
	lo.startReader(ctx, &trace.L7Reader{Events: objs.EventsMap(), Lost: objs.EventsLost, Hub: f.a.trace,
		Node: f.a.cfg.NodeName, Pods: f.a.pods, Cgroups: f.a.pods, Ready: f.a.namesReady(),
		LostFile: f.a.statePath(L7EventsLostFile), Log: f.a.log.With("feature", apiv1.FeatureL7)})
	f.start(ctx, lo, syncer)
	f.a.log.Info("attached", "feature", apiv1.FeatureL7, "hooks", sockmap.Hooks(), "cgroup", f.a.cfg.CgroupRoot, "xds", sock)
	return nil
}

// ContributeStatus adds Envoy's state to NodeState.
func (f *l7Feature) ContributeStatus(st *apiv1.NodeStateStatus) {
	f.mu.Lock()
	s, ok := f.syncer.(*l7.Syncer)
	f.mu.Unlock()
	if ok {
		l7st := s.Status()
		st.L7 = &l7st
	}
}

// ensureOrder re-attaches the steering programs when the socket LB's were
// attached after them (service-lb enabled again while l7 runs): steering
// must see the backend the LB chose, or a ClusterIP connection to a
// selected pod would bypass Envoy.
func (f *l7Feature) ensureOrder() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	lo, ok := f.objs.(*l7Objects)
	if !ok {
		return nil
	}
	if err := sockmap.CheckOrder(f.a.cfg.CgroupRoot); err == nil {
		return nil
	}
	f.a.log.Info("re-attaching l7 steering after the socket LB", "cgroup", f.a.cfg.CgroupRoot)
	return lo.objs.Reattach(f.a.cfg.CgroupRoot)
}

// l7Objects are what Disable and Close release: the datapath and the
// xDS server (whose socket goes with it).
type l7Objects struct {
	objs *sockmap.Objects
	srv  *xds.Server
	sock string

	stopRead   context.CancelFunc
	readerDone chan struct{}
}

// startReader runs the steering events reader until Detach or Close. A
// reader that fails leaves steering running (the trace is not worth an
// L7 outage); it says so in the log.
func (o *l7Objects) startReader(ctx context.Context, r *trace.L7Reader) {
	rctx, cancel := context.WithCancel(ctx)
	o.stopRead, o.readerDone = cancel, make(chan struct{})
	go func() {
		defer close(o.readerDone)
		if err := r.Run(rctx); err != nil {
			r.Log.Error("l7 trace reader stopped", "err", err)
		}
	}()
}

func (o *l7Objects) stopReader() {
	if o.stopRead != nil {
		o.stopRead()
		<-o.readerDone
		o.stopRead = nil
	}
}

func (o *l7Objects) stopServer() error {
	o.srv.Stop()
	if err := os.Remove(o.sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Detach: steering goes first, then the server; Envoy keeps its last
// configuration but nothing is steered to it any more.
func (o *l7Objects) Detach() error {
	o.stopReader()
	return errors.Join(o.objs.Detach(), o.stopServer())
}

// Close keeps steering (pinned) and Envoy's last configuration: the next
// agent's server takes over when Envoy reconnects.
func (o *l7Objects) Close() error {
	o.stopReader()
	return errors.Join(o.stopServer(), o.objs.Close())
}

// sockmapDatapath adapts bpf/sockmap to the sync's Datapath.
type sockmapDatapath struct{ *sockmap.Objects }

func (d sockmapDatapath) SetEnvoyListener(l netip.AddrPort) error {
	return d.SetEnvoy(sockmap.Envoy{Listener: l})
}
