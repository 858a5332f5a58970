//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
)

func init() {
	register(Registration{
		Name: apiv1.FeaturePolicy,
		Kernel: func(cfg *Config) []string {
			need := []string{features.BPFSyscall, features.ProgSchedCLS, features.MapLPMTrie, features.MapLRUHash}
			if cfg.PolicyAttach == dp.AttachTCX {
				need = append(need, features.LinkTCX) // auto falls back to clsact
			}
			return need
		},
		NeedsAPI: true, // NetworkPolicies, Pods, Namespaces
		New:      func(a *Agent, _ prometheus.Registerer) Feature { return newPolicyFeature(a) },
	})
}

// policyFeature enforces NetworkPolicy on this node's pods: tcx programs on
// each pod's host-side interface, programmed by the policy compiler.
type policyFeature struct {
	syncedFeature
	a *Agent

	// chainStop ends the loop keeping kebpf-cni chained (cni.go).
	chainStop func()
}

func newPolicyFeature(a *Agent) *policyFeature {
	f := &policyFeature{a: a}
	f.syncedFeature = syncedFeature{name: apiv1.FeaturePolicy, log: a.log,
		detachPinned: func() error { return dp.DetachPinned(a.cfg.PinDir) }}
	return f
}

func (f *policyFeature) Name() string { return apiv1.FeaturePolicy }

// nodeIPs are the node's addresses from its Node object: traffic between the
// node and its pods (kubelet probes) is always allowed.
func (a *Agent) nodeIPs(ctx context.Context) ([]netip.Addr, error) {
	n, err := a.cfg.Kube.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get node %s: %w", a.cfg.NodeName, err)
	}
	var ips []netip.Addr
	for _, ad := range n.Status.Addresses {
		if ad.Type != corev1.NodeInternalIP && ad.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(ad.Address); err == nil {
			ips = append(ips, ip)
		}
	}
	return ips, nil
}

func (f *policyFeature) Enable(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running() {
		return nil
	}
	ips, err := f.a.nodeIPs(ctx)
	if err != nil {
		return err
	}
	objs, err := dp.Load(f.a.cfg.PinDir, dp.LoadOptions{Logger: f.a.log.With("feature", apiv1.FeaturePolicy), Attach: f.a.cfg.PolicyAttach})
	if err != nil {
		return err
	}
	s, err := netpol.New(netpol.Options{
		Base:     f.a.syncBase(apiv1.FeaturePolicy, apisync.Intervals{}),
		NodeIPs:  ips,
		Datapath: objs,
	})
	if err != nil {
		objs.Close()
		return err
	}
	f.start(ctx, objs, s)
	// Chained only once the syncer runs, so the plugin never waits for a
	// feature that is not there; from then on no pod starts unprogrammed.
	f.chainStop = f.a.keepChained(ctx, dp.MapPinPaths(f.a.cfg.PinDir)[0])
	f.a.log.Info("enabled", "feature", apiv1.FeaturePolicy, "nodeIPs", ips, "attach", objs.AttachMode().String())
	return nil
}

// Disable unchains the CNI plugin first (new pods stop waiting for us),
// then removes enforcement.
func (f *policyFeature) Disable() error {
	f.stopChain()
	err := f.a.unchain()
	return errors.Join(err, f.syncedFeature.Disable())
}

// Close (agent exit) leaves the plugin chained: while the agent restarts,
// a pod's sandbox fails and is retried rather than starting unprotected.
func (f *policyFeature) Close() error {
	f.stopChain()
	return f.syncedFeature.Close()
}

func (f *policyFeature) stopChain() {
	f.mu.Lock()
	stop := f.chainStop
	f.chainStop = nil
	f.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// policySyncer is the running policy sync, nil when the feature is off.
func (f *policyFeature) policySyncer() *netpol.Syncer {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, _ := f.syncer.(*netpol.Syncer)
	return s
}
