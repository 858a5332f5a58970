//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockstats"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
)

func init() {
	register(Registration{
		Name:   apiv1.FeatureSockStats,
		Kernel: func(*Config) []string { return features.Required },
		New: func(a *Agent, reg prometheus.Registerer) Feature {
			f := &sockstatsFeature{a: a}
			reg.MustRegister(&socketCollector{f: f})
			return f
		},
	})
}

// sockstatsFeature is the foundation datapath: socket creation counters.
type sockstatsFeature struct {
	a    *Agent
	mu   sync.Mutex
	objs *sockstats.Objects
}

func (f *sockstatsFeature) Name() string { return apiv1.FeatureSockStats }

func (f *sockstatsFeature) Enable(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs != nil && f.objs.Attached() {
		return nil
	}
	objs, err := sockstats.Load(f.a.cfg.PinDir)
	if err != nil {
		return err
	}
	if err := objs.Attach(f.a.cfg.CgroupRoot); err != nil {
		objs.Close()
		return err
	}
	f.objs = objs
	f.a.log.Info("attached", "program", sockstats.ProgramName, "cgroup", f.a.cfg.CgroupRoot,
		"link", sockstats.LinkPinPath(f.a.cfg.PinDir))
	return nil
}

func (f *sockstatsFeature) Disable() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs != nil {
		err := f.objs.Detach()
		f.objs = nil
		return err
	}
	// Nothing loaded here: remove what an earlier agent pinned.
	errs := []error{sockstats.DetachPinned(f.a.cfg.PinDir)}
	if err := os.Remove(sockstats.MapPinPath(f.a.cfg.PinDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("unpin %s: %w", sockstats.MapName, err))
	}
	return errors.Join(errs...)
}

func (f *sockstatsFeature) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objs == nil {
		return nil
	}
	err := f.objs.Close()
	f.objs = nil
	return err
}

// socketCollector reads the counters at scrape time, so the metric is never
// staler than the scrape; while sockstats is disabled it reports nothing.
type socketCollector struct{ f *sockstatsFeature }

var socketsDesc = prometheus.NewDesc("kebpf_sockets_created_total",
	"Sockets created below the cgroup root since the counter map was pinned, by address family.",
	[]string{"family"}, nil)

func (c *socketCollector) Describe(ch chan<- *prometheus.Desc) { ch <- socketsDesc }

func (c *socketCollector) Collect(ch chan<- prometheus.Metric) {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if c.f.objs == nil {
		return
	}
	counts, err := c.f.objs.Counts()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(socketsDesc, err)
		return
	}
	for _, fam := range []string{"inet", "inet6", "other"} {
		ch <- prometheus.MustNewConstMetric(socketsDesc, prometheus.CounterValue, float64(counts.ByFamily()[fam]), fam)
	}
}
