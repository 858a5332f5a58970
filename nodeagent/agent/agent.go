//go:build linux

// Package agent is the node agent daemon: it probes the kernel, attaches the
// datapath, serves health and metrics on loopback and publishes NodeState.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/podindex"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

// FieldManager owns the NodeState fields the agent applies.
const FieldManager = "kebpf-agent"

// DefaultHeartbeat is how often NodeState is re-applied.
const DefaultHeartbeat = 30 * time.Second

// DefaultRetry is how soon a feature whose Enable or Disable failed is
// tried again.
const DefaultRetry = 5 * time.Second

// statusPoll is how often the agent checks whether NodeState's active list
// or errors changed, so `kubectl ebpf status` converges within seconds
// rather than a heartbeat.
const statusPoll = time.Second

// Config configures Run.
type Config struct {
	NodeName   string
	PinDir     string
	CgroupRoot string
	HealthAddr string
	Version    string
	// Client publishes NodeState; nil runs without an API server (the
	// agent then never becomes ready, as readiness requires a publish).
	Client versioned.Interface
	// Kube watches the cluster config and, for service-lb, Services,
	// EndpointSlices and the node. Nil: no config watch, every feature
	// this agent can run without it is enabled (tests, bare runs).
	Kube      kubernetes.Interface
	Log       *slog.Logger
	Heartbeat time.Duration
	// Retry is how soon failed feature switches are retried (default
	// DefaultRetry).
	Retry time.Duration
	// Listener, when set, is served instead of listening on HealthAddr
	// (tests pass an ephemeral loopback port).
	Listener net.Listener

	// ConfigNamespace/ConfigName locate the cluster config ConfigMap
	// (defaults: manifests.Namespace, manifests.ConfigMapName).
	ConfigNamespace, ConfigName string
	// Features replaces the registered features (tests).
	Features []Feature
	// ServiceLB sizes the socket LB maps (zero: socklb's defaults).
	ServiceLB socklb.LoadOptions
	// ServiceSync overrides the service sync's runner intervals (zero
	// fields: servicelb.DefaultIntervals).
	ServiceSync apisync.Intervals
	// OnServiceSync observes every service sync (tests, benchmarks).
	OnServiceSync func(servicelb.SyncResult)
	// CNI chains kebpf-cni while the policy feature runs.
	CNI CNIConfig
	// PolicyAttach selects tcx or clsact for the policy programs (zero:
	// auto, tcx where the kernel has it).
	PolicyAttach netpol.AttachMode
	// L7 configures the l7 feature; L7Sync overrides its runner intervals.
	L7     L7Config
	L7Sync apisync.Intervals
	// StateDir keeps what must survive an agent restart but is not a pin:
	// the policy ID -> name mapping the trace names verdicts with. It should
	// live as long as the pins (a tmpfs under /run: a reboot clears both).
	// Empty: nothing is kept, and a restarted agent cannot name the
	// policies of events its predecessor's datapath wrote.
	StateDir string
	// Trace sizes the trace ring and the per-client queues (zero fields:
	// the trace package's defaults; Node and Registerer are set by New).
	Trace trace.Options
	// LBTraceOff turns the socket LB's trace events off (the pinned switch
	// kebpf_lb_cfg, written when service-lb is enabled).
	LBTraceOff bool
}

// Agent is one running agent.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	kernel string

	reg   *prometheus.Registry
	trace *trace.Hub      // this node's events for /trace
	pods  *podindex.Index // pods by IP and by cgroup, for every feature's names
	feats []*featureState // fixed at New; their fields are guarded by mu
	wake  chan struct{}

	mu         sync.Mutex
	features   []apiv1.KernelFeature // kernel probes
	want       apiv1.AgentConfig
	haveConfig bool
	configErr  string
	published  bool
	lastStatus string // active+errors last published
}

// New validates cfg and probes the kernel.
func New(cfg Config) (*Agent, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("node name is empty: set --node-name or NODE_NAME")
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = DefaultHeartbeat
	}
	if cfg.Retry == 0 {
		cfg.Retry = DefaultRetry
	}
	if cfg.ConfigNamespace == "" {
		cfg.ConfigNamespace = manifests.Namespace
	}
	if cfg.ConfigName == "" {
		cfg.ConfigName = manifests.ConfigMapName
	}
	a := &Agent{cfg: cfg, log: cfg.Log, kernel: kernelRelease(), reg: prometheus.NewRegistry(),
		wake: make(chan struct{}, 1)}
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	topts := cfg.Trace
	topts.Node, topts.Registerer = cfg.NodeName, a.reg
	hub, err := trace.NewHub(topts)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	a.trace = hub
	// Fed by a pod informer from Run when there is an API server; empty
	// (names nothing) otherwise.
	a.pods = podindex.New(cfg.NodeName, cfg.CgroupRoot)
	for _, f := range cfg.Features {
		a.feats = append(a.feats, &featureState{f: f})
	}
	if cfg.Features == nil {
		for _, r := range registered() {
			if r.NeedsAPI && cfg.Kube == nil {
				continue
			}
			st := &featureState{f: r.New(a, a.reg)}
			if r.Kernel != nil {
				st.kernel = r.Kernel(&a.cfg)
			}
			a.feats = append(a.feats, st)
		}
	}
	return a, nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Ready reports whether every enabled feature is attached and NodeState
// published; when not, the reason. Errors of a running feature (a Service
// that does not fit the maps) do not make the agent unready: restarting or
// bypassing it would not help.
func (a *Agent) Ready() (bool, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if why := a.notReadyReasonLocked(); why != "" {
		return false, why
	}
	return true, "ok"
}

// Run serves until ctx is cancelled.
//
// On return it closes its handles WITHOUT detaching: links and maps are
// pinned, so the datapath keeps running across agent restarts and upgrades
// (the next agent swaps its programs into the pinned links). Only a
// feature switched off in the config, or `kebpf-agent cleanup`, removes it.
func (a *Agent) Run(ctx context.Context) error {
	srv, ln, err := a.serve()
	if err != nil {
		return err
	}
	a.log.Info("serving health and metrics", "addr", ln.Addr().String())
	if err := a.serveCNI(ctx); err != nil {
		srv.Close()
		return err
	}
	go a.unchainStale(ctx)
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
		a.closeFeatures()
		a.unchainIfRemoved()
		a.log.Info("stopped; datapath left attached via pins", "pinDir", a.cfg.PinDir)
	}()

	a.probe()
	if a.cfg.Kube != nil {
		go a.pods.Run(ctx, a.cfg.Kube)
		go a.watchConfig(ctx)
	} else {
		a.mu.Lock()
		a.want, a.haveConfig = a.defaultConfig(), true
		a.mu.Unlock()
	}
	a.converge(ctx)
	a.publish(ctx)

	heartbeat := time.NewTicker(a.cfg.Heartbeat)
	defer heartbeat.Stop()
	poll := time.NewTicker(min(statusPoll, a.cfg.Heartbeat))
	defer poll.Stop()
	var lastTry time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.wake:
			a.converge(ctx)
			lastTry = time.Now()
			a.publishIfChanged(ctx)
		case <-poll.C:
			if a.pendingRetry() && time.Since(lastTry) >= a.cfg.Retry {
				a.probe() // e.g. the mount appeared after we started
				a.converge(ctx)
				lastTry = time.Now()
			}
			a.publishIfChanged(ctx)
		case <-heartbeat.C:
			a.publish(ctx)
		}
	}
}

// probe (re)runs the kernel probes.
func (a *Agent) probe() {
	fs := features.Probe(a.cfg.CgroupRoot)
	a.mu.Lock()
	a.features = fs
	a.mu.Unlock()
}

// ensureMounts normally finds both mounts made by the `mount` init
// container; mounting here is a fallback for running the agent by hand.
func (a *Agent) ensureMounts() error {
	if ok, err := mounts.IsCgroup2(a.cfg.CgroupRoot); err != nil {
		return err
	} else if !ok {
		a.log.Warn("cgroup2 not mounted at cgroup root; mounting it (in a container this is the container's cgroup namespace root, run `kebpf-agent mount` on the host instead)",
			"path", a.cfg.CgroupRoot)
		if _, err := mounts.EnsureCgroup2(a.cfg.CgroupRoot, ""); err != nil {
			return fmt.Errorf("cgroup root %s: %w", a.cfg.CgroupRoot, err)
		}
	}
	if err := mounts.EnsurePinDir(a.cfg.PinDir); err != nil {
		bpffs := filepath.Dir(a.cfg.PinDir)
		a.log.Warn("pin dir not on bpffs; mounting bpffs", "path", bpffs)
		if _, merr := mounts.EnsureBPFFS(bpffs); merr != nil {
			return fmt.Errorf("%w (mount fallback: %w)", err, merr)
		}
		return mounts.EnsurePinDir(a.cfg.PinDir)
	}
	return nil
}

// State is the NodeState the agent would publish now.
func (a *Agent) State() *apiv1.NodeState {
	a.mu.Lock()
	defer a.mu.Unlock()
	active, errs := a.activeAndErrorsLocked()
	st := apiv1.NodeStateStatus{
		AgentVersion: a.cfg.Version,
		Kernel:       a.kernel,
		Features:     append([]apiv1.KernelFeature(nil), a.features...),
		Active:       active,
		Errors:       errs,
		Heartbeat:    metav1.NewTime(time.Now().UTC().Truncate(time.Second)),
	}
	for _, fs := range a.feats {
		if c, ok := fs.f.(StatusContributor); ok && fs.active {
			c.ContributeStatus(&st)
		}
	}
	st.Trace = traceStatus(a.trace.Stats())
	// Ready in NodeState is stricter than /readyz: any error counts.
	st.Ready = a.haveConfig && a.allEnabledActiveLocked() && len(st.Errors) == 0
	return &apiv1.NodeState{
		TypeMeta: metav1.TypeMeta{APIVersion: apiv1.NodeStateGVK.GroupVersion().String(), Kind: apiv1.NodeStateKind},
		ObjectMeta: metav1.ObjectMeta{
			Name: a.cfg.NodeName,
			Labels: map[string]string{
				"app.kubernetes.io/managed-by": "kubectl-ebpf",
				"app.kubernetes.io/part-of":    "kubectl-ebpf",
			},
		},
		Status: st,
	}
}

// publish server-side-applies NodeState; Force because this agent is the
// only writer of its node's object, whatever an earlier manager left.
func (a *Agent) publish(ctx context.Context) {
	if a.cfg.Client == nil {
		return
	}
	state := a.State()
	// The clientset has no Apply without generated apply configurations; a
	// whole NodeState (apiVersion and kind set by State) is a valid apply
	// patch, and the agent owns every field of it.
	body, err := json.Marshal(state)
	if err != nil {
		a.log.Error("publish nodestate", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = a.cfg.Client.EbpfV1alpha1().NodeStates().Patch(ctx, a.cfg.NodeName, types.ApplyPatchType, body,
		metav1.PatchOptions{FieldManager: FieldManager, Force: new(true)})
	if err != nil {
		a.log.Error("publish nodestate", "node", a.cfg.NodeName, "err", err)
		return
	}
	a.mu.Lock()
	first := !a.published
	a.published = true
	a.lastStatus = statusKey(state.Status)
	a.mu.Unlock()
	if first {
		a.log.Info("published nodestate", "node", a.cfg.NodeName)
	} else {
		a.log.Debug("heartbeat", "node", a.cfg.NodeName)
	}
}

func (a *Agent) serve() (*http.Server, net.Listener, error) {
	reg := a.reg
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kebpf_agent_info",
		Help: "Agent build and kernel; always 1.",
	}, []string{"version", "kernel"})
	info.WithLabelValues(a.cfg.Version, a.kernel).Set(1)
	if err := reg.Register(info); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, nil, fmt.Errorf("register metrics: %w", err)
		}
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ok, why := a.Ready()
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, why)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	// Loopback only like the rest: clients reach it through the API server
	// (a port-forward to the agent pod), with their own RBAC.
	mux.Handle("GET /trace", a.trace.Handler())
	mux.Handle("GET "+apiv1.ExplainPath, trace.ExplainHandler(a.cfg.NodeName, a.explainSource))

	ln := a.cfg.Listener
	if ln == nil {
		if err := loopbackOnly(a.cfg.HealthAddr); err != nil {
			return nil, nil, err
		}
		var err error
		ln, err = net.Listen("tcp", a.cfg.HealthAddr)
		if err != nil {
			return nil, nil, fmt.Errorf("listen %s: %w", a.cfg.HealthAddr, err)
		}
	}
	// Shutdown waits for open requests; following trace streams end only
	// when their context does, so shutting down cancels them.
	base, cancelStreams := context.WithCancel(context.Background())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return base }}
	srv.RegisterOnShutdown(cancelStreams)
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("health server", "err", err)
			os.Exit(1)
		}
	}()
	return srv, ln, nil
}

// loopbackOnly refuses non-loopback addresses: the endpoints are
// unauthenticated and the agent runs with hostNetwork.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("health addr %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("health addr %q: must be a loopback IP (endpoints are unauthenticated)", addr)
	}
	return nil
}

// publishIfChanged publishes when the status (but the heartbeat) differs
// from what was last published (or nothing was published yet).
func (a *Agent) publishIfChanged(ctx context.Context) {
	key := statusKey(a.State().Status)
	a.mu.Lock()
	changed := !a.published || key != a.lastStatus
	a.mu.Unlock()
	if changed {
		a.publish(ctx)
	}
}

// statusKey identifies what a NodeState says, heartbeat aside.
func statusKey(st apiv1.NodeStateStatus) string {
	st.Heartbeat = metav1.Time{}
	// Trace counts ride on the heartbeat (a busy node would otherwise
	// publish every poll), except that a reason's first loss goes out now.
	if st.Trace != nil {
		t := &apiv1.TraceNodeStatus{Lost: map[string]int64{}}
		for r, n := range st.Trace.Lost {
			if n > 0 {
				t.Lost[r] = 1
			}
		}
		st.Trace = t
	}
	b, _ := json.Marshal(st)
	return string(b)
}

// allEnabledActiveLocked reports whether every enabled feature is active.
func (a *Agent) allEnabledActiveLocked() bool {
	for _, st := range a.feats {
		if a.want.Enabled(st.f.Name()) && !st.active {
			return false
		}
	}
	return true
}
