//go:build linux

package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
)

// serviceLBFeature is connect-time service load balancing: the socklb
// programs plus the service sync that programs their maps.
type serviceLBFeature struct {
	a       *Agent
	metrics *servicelb.Metrics

	mu     sync.Mutex
	objs   *socklb.Objects
	syncer *servicelb.Syncer
	cancel context.CancelFunc
	done   chan struct{}
	runErr error
}

func (f *serviceLBFeature) Name() string { return socklb.Feature }

func (f *serviceLBFeature) Enable(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs != nil {
		return nil
	}
	if f.a.cfg.Kube == nil {
		return errors.New("needs an API client to watch Services")
	}
	if err := f.a.requireKernel(features.BPFSyscall, features.CgroupV2, features.ProgCgroupSockAddr, features.LinkCgroup); err != nil {
		return err
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
		Client:          f.a.cfg.Kube,
		NodeName:        f.a.cfg.NodeName,
		Datapath:        objs,
		Metrics:         f.metrics,
		Log:             f.a.log.With("feature", socklb.Feature),
		MinSyncInterval: f.a.cfg.ServiceSyncMin,
		MaxSyncInterval: f.a.cfg.ServiceSyncMax,
		OnSync:          f.a.cfg.OnServiceSync,
	})
	if err != nil {
		objs.Close()
		return err
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	f.objs, f.syncer, f.cancel, f.done, f.runErr = objs, s, cancel, done, nil
	go func() {
		defer close(done)
		if err := s.Run(sctx); err != nil {
			f.a.log.Error("service sync stopped", "err", err)
			f.mu.Lock()
			f.runErr = err
			f.mu.Unlock()
		}
	}()
	f.a.log.Info("attached", "feature", socklb.Feature, "hooks", socklb.Hooks(), "cgroup", f.a.cfg.CgroupRoot)
	return nil
}

// stop ends the sync; f.mu must not be held (Run's error path takes it).
func (f *serviceLBFeature) stop() {
	f.mu.Lock()
	cancel, done := f.cancel, f.done
	f.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

func (f *serviceLBFeature) Disable() error {
	f.stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncer, f.cancel, f.done = nil, nil, nil
	if f.objs == nil {
		return socklb.DetachPinned(f.a.cfg.PinDir)
	}
	// Established connections are unaffected: they were translated at
	// connect time and carry the backend address already.
	err := f.objs.Detach()
	f.objs = nil
	return err
}

func (f *serviceLBFeature) Close() error {
	f.stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncer, f.cancel, f.done = nil, nil, nil
	if f.objs == nil {
		return nil
	}
	err := f.objs.Close()
	f.objs = nil
	return err
}

func (f *serviceLBFeature) Errors() []string {
	f.mu.Lock()
	s, runErr := f.syncer, f.runErr
	f.mu.Unlock()
	var out []string
	if runErr != nil {
		out = append(out, "service sync stopped: "+runErr.Error())
	}
	if s != nil {
		out = append(out, s.Errors()...)
	}
	return out
}

// NetnsDir is where container runtimes (containerd with CNI, as on kind and
// the local cluster) bind-mount pod network namespaces; the DaemonSet mounts
// the host's copy here.
const NetnsDir = "/run/netns"

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
	if c.f.objs == nil {
		return
	}
	st, err := c.f.objs.Stats()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(lbConnectsDesc, err)
		return
	}
	for verdict, v := range map[string]uint64{"translated": st.Translated, "refused": st.Refused, "passed": st.Passed} {
		ch <- prometheus.MustNewConstMetric(lbConnectsDesc, prometheus.CounterValue, float64(v), verdict)
	}
}
