//go:build linux

package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/types"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"

	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

func init() {
	register(Registration{
		Name: apiv1.FeatureServiceLB,
		Kernel: func(*Config) []string {
			// kfunc-sock-destroy is not required: without it the LB works
			// and only UDP sockets of a removed backend stay open (the
			// feature list shows it unavailable, with the reason).
			return []string{features.BPFSyscall, features.CgroupV2, features.ProgCgroupSockAddr, features.LinkCgroup,
				features.HelperSetRetval, features.MapRingBuf}
		},
		NeedsAPI: true, // Services and EndpointSlices
		New: func(a *Agent, reg prometheus.Registerer) Feature {
			f := newServiceLBFeature(a, servicelb.NewMetrics(reg))
			reg.MustRegister(&lbCollector{f: f})
			return f
		},
	})
}

// serviceLBFeature is connect-time service load balancing: the socklb
// programs plus the service sync that programs their maps.
type serviceLBFeature struct {
	syncedFeature
	a       *Agent
	metrics *servicelb.Metrics
}

func newServiceLBFeature(a *Agent, m *servicelb.Metrics) *serviceLBFeature {
	f := &serviceLBFeature{a: a, metrics: m}
	f.syncedFeature = syncedFeature{name: apiv1.FeatureServiceLB, log: a.log,
		detachPinned: func() error { return socklb.DetachPinned(a.cfg.PinDir) }}
	return f
}

func (f *serviceLBFeature) Name() string { return apiv1.FeatureServiceLB }

func (f *serviceLBFeature) Enable(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running() {
		return nil
	}
	opts := f.a.cfg.ServiceLB
	if opts.DestroyNetns == nil {
		opts.DestroyNetns = podNetns
	}
	objs, err := socklb.Load(f.a.cfg.PinDir, opts)
	if err != nil {
		return err
	}
	// The switch is pinned: set it every time, so the flag, not an earlier
	// agent, decides. A failure costs the trace, not the LB.
	if err := objs.SetTrace(!f.a.cfg.LBTraceOff); err != nil {
		f.a.log.Error("set lb trace switch", "err", err)
	}
	// Attach before the first sync: pinned maps from an earlier agent are
	// already complete, and empty fresh maps translate nothing (connects
	// then go where they would without us, e.g. to kube-proxy).
	if err := objs.Attach(f.a.cfg.CgroupRoot); err != nil {
		objs.Close()
		return err
	}
	s, err := servicelb.New(servicelb.Options{
		Base:     f.a.syncBase(apiv1.FeatureServiceLB, f.a.cfg.ServiceSync),
		Datapath: objs,
		Metrics:  f.metrics,
		OnSync:   f.a.cfg.OnServiceSync,
	})
	if err != nil {
		objs.Close()
		return err
	}
	log := f.a.log.With("feature", apiv1.FeatureServiceLB)
	f.start(ctx, objs, &tracedRun{syncRunner: s, log: log, what: "lb trace reader", reader: &trace.LBReader{
		Events: objs.EventsMap(), Lost: objs.EventsLost, Hub: f.a.trace, Node: f.a.cfg.NodeName,
		Services: lbNamer{s}, Pods: f.a.pods, Cgroups: f.a.pods, Ready: f.a.namesReady(),
		LostFile: f.a.statePath(LBEventsLostFile), Log: log,
	}})
	f.a.log.Info("attached", "feature", apiv1.FeatureServiceLB, "hooks", socklb.Hooks(), "cgroup", f.a.cfg.CgroupRoot)
	return nil
}

// lbNamer names the socket LB's service IDs from the sync's ID table.
type lbNamer struct{ *servicelb.Syncer }

func (n lbNamer) ServicePort(id uint32) (types.NamespacedName, string, bool) {
	k, ok := n.PortByID(id)
	return k.Service, k.PortName, ok
}

// tracedRun is a feature's sync plus the reader of its trace events; both
// stop with the feature. A reader that fails leaves the datapath and its
// sync running (the trace is not worth an outage) and says so in the
// feature's errors.
type tracedRun struct {
	syncRunner
	log       *slog.Logger
	what      string
	reader    interface{ Run(context.Context) error }
	readerErr atomic.Pointer[string]
}

func (p *tracedRun) Run(ctx context.Context) error {
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := p.reader.Run(rctx); err != nil {
			p.log.Error(p.what+" stopped", "err", err)
			msg := p.what + " stopped: " + err.Error()
			p.readerErr.Store(&msg)
		}
	}()
	err := p.syncRunner.Run(ctx)
	cancel()
	<-done
	return err
}

func (p *tracedRun) Errors() []string {
	out := p.syncRunner.Errors()
	if msg := p.readerErr.Load(); msg != nil {
		out = append(out, *msg)
	}
	return out
}

// NetnsDir is where container runtimes (containerd with CNI, as on kind and
// the local cluster) bind-mount pod network namespaces; the DaemonSet mounts
// the host's copy here.
const NetnsDir = netnsutil.Dir

// podNetns lists the network namespaces whose connected UDP sockets to a
// removed backend are destroyed: the node's own ("", the agent runs in it:
// hostNetwork pods and the node's processes) and every pod's, as socket
// iterators only walk the namespace they are opened in.
func podNetns() []string {
	out := []string{""}
	ents, err := os.ReadDir(NetnsDir)
	if err != nil {
		return out
	}
	for _, e := range ents {
		out = append(out, filepath.Join(NetnsDir, e.Name()))
	}
	return out
}

// lbCollector exports the datapath's per-connect verdicts at scrape time;
// while service-lb is disabled it reports nothing.
type lbCollector struct{ f *serviceLBFeature }

var lbConnectsDesc = prometheus.NewDesc("kebpf_lb_connects_total",
	"connect()/sendmsg() calls seen by the socket LB since its maps were pinned, by verdict: translated to a backend, refused (no endpoints), passed (not a Service address).",
	[]string{"verdict"}, nil)

func (c *lbCollector) Describe(ch chan<- *prometheus.Desc) { ch <- lbConnectsDesc }

func (c *lbCollector) Collect(ch chan<- prometheus.Metric) {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	objs, ok := c.f.objs.(*socklb.Objects)
	if !ok {
		return
	}
	st, err := objs.Stats()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(lbConnectsDesc, err)
		return
	}
	for verdict, v := range map[string]uint64{"translated": st.Translated, "refused": st.Refused, "passed": st.Passed} {
		ch <- prometheus.MustNewConstMetric(lbConnectsDesc, prometheus.CounterValue, float64(v), verdict)
	}
}
