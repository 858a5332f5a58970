//go:build linux

// Package agent is the node agent daemon: it probes the kernel, attaches the
// datapath, serves health and metrics on loopback and publishes NodeState.
package agent

import (
	"context"
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
	"k8s.io/client-go/dynamic"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockstats"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/nodestate"
)

// FieldManager owns the NodeState fields the agent applies.
const FieldManager = "kebpf-agent"

// DefaultHeartbeat is how often NodeState is re-applied.
const DefaultHeartbeat = 30 * time.Second

// Config configures Run.
type Config struct {
	NodeName   string
	PinDir     string
	CgroupRoot string
	HealthAddr string
	Version    string
	// Client publishes NodeState; nil runs without an API server (the
	// agent then never becomes ready, as readiness requires a publish).
	Client    dynamic.Interface
	Log       *slog.Logger
	Heartbeat time.Duration
	// Listener, when set, is served instead of listening on HealthAddr
	// (tests pass an ephemeral loopback port).
	Listener net.Listener
}

// Agent is one running agent.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	kernel string

	mu        sync.Mutex
	features  []nodestate.Feature
	objs      *sockstats.Objects
	errs      []string // setup errors, reported in NodeState
	published bool
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
	a := &Agent{cfg: cfg, log: cfg.Log, kernel: kernelRelease()}
	return a, nil
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Ready reports whether the datapath is attached and NodeState published;
// when not, the reason.
func (a *Agent) Ready() (bool, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.objs == nil || !a.objs.Attached():
		if len(a.errs) > 0 {
			return false, "datapath not attached: " + a.errs[len(a.errs)-1]
		}
		return false, "datapath not attached yet"
	case !a.published:
		return false, "NodeState not published yet"
	}
	return true, "ok"
}

// Run serves until ctx is cancelled.
//
// On return it closes its handles WITHOUT detaching: the link and map are
// pinned, so the datapath keeps running across agent restarts and upgrades
// (the next agent swaps its program into the pinned link). Only `kebpf-agent
// cleanup` removes it.
func (a *Agent) Run(ctx context.Context) error {
	srv, ln, err := a.serve()
	if err != nil {
		return err
	}
	a.log.Info("serving health and metrics", "addr", ln.Addr().String())
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
		a.mu.Lock()
		if a.objs != nil {
			a.objs.Close()
		}
		a.mu.Unlock()
		a.log.Info("stopped; datapath left attached via pins", "pinDir", a.cfg.PinDir)
	}()

	a.setup()
	a.publish(ctx)
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if ok, _ := a.Ready(); !ok {
				a.setup() // e.g. the mount appeared after we started
			}
			a.publish(ctx)
		}
	}
}

// setup probes features and attaches sockstats; errors end up in NodeState.
func (a *Agent) setup() {
	fs := features.Probe(a.cfg.CgroupRoot)
	errs := features.MissingRequired(fs)
	a.mu.Lock()
	a.features = fs
	attached := a.objs != nil && a.objs.Attached()
	a.mu.Unlock()
	if len(errs) == 0 && !attached {
		if err := a.attach(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	for _, e := range errs {
		a.log.Error("setup", "err", e)
	}
	a.mu.Lock()
	a.errs = errs
	a.mu.Unlock()
}

func (a *Agent) attach() error {
	if err := a.ensureMounts(); err != nil {
		return err
	}
	objs, err := sockstats.Load(a.cfg.PinDir)
	if err != nil {
		return err
	}
	if err := objs.Attach(a.cfg.CgroupRoot); err != nil {
		objs.Close()
		return err
	}
	a.mu.Lock()
	a.objs = objs
	a.mu.Unlock()
	a.log.Info("attached", "program", sockstats.ProgramName, "cgroup", a.cfg.CgroupRoot,
		"link", sockstats.LinkPinPath(a.cfg.PinDir))
	return nil
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
func (a *Agent) State() *nodestate.NodeState {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := nodestate.Status{
		AgentVersion: a.cfg.Version,
		Kernel:       a.kernel,
		Features:     append([]nodestate.Feature(nil), a.features...),
		Errors:       append([]string(nil), a.errs...),
		Heartbeat:    metav1.NewTime(time.Now().UTC().Truncate(time.Second)),
	}
	if a.objs != nil && a.objs.Attached() {
		st.Active = []string{sockstats.Feature}
	}
	st.Ready = len(st.Active) > 0 && len(st.Errors) == 0
	return &nodestate.NodeState{
		TypeMeta: metav1.TypeMeta{APIVersion: nodestate.GVK.GroupVersion().String(), Kind: nodestate.Kind},
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
	u, err := nodestate.ToUnstructured(a.State())
	if err != nil {
		a.log.Error("publish nodestate", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = a.cfg.Client.Resource(nodestate.GVR).Apply(ctx, a.cfg.NodeName, u,
		metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	if err != nil {
		a.log.Error("publish nodestate", "node", a.cfg.NodeName, "err", err)
		return
	}
	a.mu.Lock()
	first := !a.published
	a.published = true
	a.mu.Unlock()
	if first {
		a.log.Info("published nodestate", "node", a.cfg.NodeName)
	} else {
		a.log.Debug("heartbeat", "node", a.cfg.NodeName)
	}
}

func (a *Agent) serve() (*http.Server, net.Listener, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kebpf_agent_info",
		Help: "Agent build and kernel; always 1.",
	}, []string{"version", "kernel"})
	info.WithLabelValues(a.cfg.Version, a.kernel).Set(1)
	reg.MustRegister(info, &socketCollector{a: a})

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
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
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

// socketCollector reads the counters at scrape time, so the metric is never
// staler than the scrape.
type socketCollector struct{ a *Agent }

var socketsDesc = prometheus.NewDesc("kebpf_sockets_created_total",
	"Sockets created below the cgroup root since the counter map was pinned, by address family.",
	[]string{"family"}, nil)

func (c *socketCollector) Describe(ch chan<- *prometheus.Desc) { ch <- socketsDesc }

func (c *socketCollector) Collect(ch chan<- prometheus.Metric) {
	c.a.mu.Lock()
	objs := c.a.objs
	c.a.mu.Unlock()
	if objs == nil {
		return
	}
	counts, err := objs.Counts()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(socketsDesc, err)
		return
	}
	for _, fam := range []string{"inet", "inet6", "other"} {
		ch <- prometheus.MustNewConstMetric(socketsDesc, prometheus.CounterValue, float64(counts.ByFamily()[fam]), fam)
	}
}
