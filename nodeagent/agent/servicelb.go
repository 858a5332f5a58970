//go:build linux

package agent

import (
	"context"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
)

func init() {
	register(Registration{
		Name: apiv1.FeatureServiceLB,
		Kernel: func(*Config) []string {
			return []string{features.BPFSyscall, features.CgroupV2, features.ProgCgroupSockAddr, features.LinkCgroup}
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
	f.start(ctx, objs, s)
	f.a.log.Info("attached", "feature", apiv1.FeatureServiceLB, "hooks", socklb.Hooks(), "cgroup", f.a.cfg.CgroupRoot)
	return nil
}

// NetnsDir is where container runtimes (containerd with CNI, as on kind and
// the local cluster) bind-mount pod network namespaces; the DaemonSet mounts
// the host's copy here.
const NetnsDir = netnsutil.Dir

// podNetns lists the pod network namespaces, so a connected UDP socket in a
// pod whose backend was removed is destroyed too: socket iterators only walk
// the namespace they are opened in.
func podNetns() []string {
	ents, err := os.ReadDir(NetnsDir)
	if err != nil {
		return nil
	}
	var out []string
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
