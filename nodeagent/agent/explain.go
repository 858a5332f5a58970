//go:build linux

package agent

import (
	"fmt"
	"net/netip"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

// explainSource is the running policy feature's state for /explain, or why
// there is none (trace.ErrExplainUnavailable: a 503).
func (a *Agent) explainSource() (trace.ExplainSource, error) {
	for _, st := range a.feats {
		f, ok := st.f.(*policyFeature)
		if !ok {
			continue
		}
		f.mu.Lock()
		r, _ := f.syncer.(*policyRun)
		objs, _ := f.objs.(*dp.Objects)
		f.mu.Unlock()
		if r == nil || objs == nil {
			return nil, fmt.Errorf("%w: the %s feature is not running on node %s", trace.ErrExplainUnavailable, apiv1.FeaturePolicy, a.cfg.NodeName)
		}
		if !r.Synced() {
			return nil, fmt.Errorf("%w: the %s feature on node %s has not finished its first sync", trace.ErrExplainUnavailable, apiv1.FeaturePolicy, a.cfg.NodeName)
		}
		return explainState{r.Syncer, objs}, nil
	}
	return nil, fmt.Errorf("%w: this agent has no %s feature", trace.ErrExplainUnavailable, apiv1.FeaturePolicy)
}

// explainState joins the sync's pod cache and the loaded datapath.
type explainState struct {
	*netpol.Syncer
	objs *dp.Objects
}

func (e explainState) PolicyName(id uint32) (string, bool) { return e.IDs().PolicyName(id) }

func (e explainState) Pod(k types.NamespacedName) ([]netip.Addr, bool, bool) {
	p, ok := e.Syncer.Pod(k)
	return p.IPs, p.Local, ok
}

func (e explainState) Decide(q dp.Question) (dp.Decision, error) { return e.objs.Decide(q) }

// traceStatus is NodeState's view of the hub's counts.
func traceStatus(s trace.Stats) *apiv1.TraceNodeStatus {
	// Every type and reason, zeros included: the maps are never empty. An
	// apply that drops every field of a map the previous apply set (a
	// restarted agent has counted nothing yet) leaves status.trace null on
	// the API server, which the CRD's schema then refuses, and the
	// NodeState would stop updating.
	conv := func(in map[string]uint64, keys []string) map[string]int64 {
		m := make(map[string]int64, len(keys))
		for _, k := range keys {
			m[k] = 0
		}
		for k, v := range in {
			m[k] = int64(min(v, 1<<63-1))
		}
		return m
	}
	return &apiv1.TraceNodeStatus{
		Published: conv(s.Published, apiv1.TraceTypes),
		Lost:      conv(s.Lost, []string{apiv1.TraceLostKernel, apiv1.TraceLostAgent, apiv1.TraceLostSlowClient}),
	}
}
