//go:build linux

package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/features"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

func init() {
	register(Registration{
		Name: apiv1.FeaturePolicy,
		Kernel: func(cfg *Config) []string {
			need := []string{features.BPFSyscall, features.ProgSchedCLS, features.MapLPMTrie, features.MapLRUHash,
				features.MapRingBuf, features.HelperSkbAncestorCgroupID}
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

// localIPs are the addresses of the node's own interfaces (the agent runs
// in the node's network namespace), loopback and link-local aside. They
// matter because the node's traffic to its pods leaves with the address of
// the interface towards them, which is not always a Node address: with a
// bridge CNI it is the bridge's gateway address.
func localIPs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := p.Addr().Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
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
	ids := f.a.loadPolicyIDs()
	s, err := netpol.New(netpol.Options{
		Base:     f.a.syncBase(apiv1.FeaturePolicy, apisync.Intervals{}),
		NodeIPs:  ips,
		LocalIPs: localIPs,
		Datapath: objs,
		IDs:      ids,
	})
	if err != nil {
		objs.Close()
		return err
	}
	f.start(ctx, objs, &policyRun{Syncer: s, log: f.a.log, reader: &trace.PolicyReader{
		Events: objs.EventsMap(), Lost: objs.EventsLost, Hub: f.a.trace, Node: f.a.cfg.NodeName, Namer: policyNamer{s},
		Ready: s.CachesSynced(), Log: f.a.log.With("feature", apiv1.FeaturePolicy), LostFile: f.a.statePath(PolicyEventsLostFile),
	}})
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
	err = errors.Join(err, f.syncedFeature.Disable())
	// The pins are gone, so no record names these IDs any more, and the
	// lost count they kept is gone with them.
	for _, p := range []string{f.a.policyIDsPath(), f.a.statePath(PolicyEventsLostFile)} {
		if p == "" {
			continue
		}
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// PolicyEventsLostFile under Config.StateDir keeps the last kernel lost
// count the trace reader read, so the next agent reports what was lost
// while none read (trace.PolicyReader.LostFile).
const PolicyEventsLostFile = "policy-events-lost.json"

// The same for the socket LB's and the L7 steering's rings. A file left by
// a disabled feature is harmless: it names the kernel ID of a map that is
// gone, and a reader ignores a count of another map.
const (
	LBEventsLostFile = "lb-events-lost.json"
	L7EventsLostFile = "l7-events-lost.json"
)

// namesReady is closed once the agent's pod index can name pods (nil
// without an API server: nothing will name them, so readers need not wait).
func (a *Agent) namesReady() <-chan struct{} {
	if a.cfg.Kube == nil {
		return nil
	}
	return a.pods.Synced()
}

// statePath is name under Config.StateDir, "" when nothing is kept.
func (a *Agent) statePath(name string) string {
	if a.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(a.cfg.StateDir, name)
}

// PolicyIDsFile is the policy ID -> name mapping under Config.StateDir.
const PolicyIDsFile = "policy-ids.json"

func (a *Agent) policyIDsPath() string {
	if a.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(a.cfg.StateDir, PolicyIDsFile)
}

// loadPolicyIDs reads the policy IDs an earlier agent persisted. An
// unreadable file must not stop enforcement: it is set aside and the new
// IDs start at the current Unix time in seconds, above any ID the lost file
// can have held (IDs grow by one per policy), so the trace shows the earlier
// flows' policies as unknown rather than by wrong names.
func (a *Agent) loadPolicyIDs() *netpol.IDs {
	p := a.policyIDsPath()
	if p == "" {
		return netpol.NewIDs()
	}
	ids, err := netpol.LoadIDs(p)
	if err == nil {
		return ids
	}
	a.log.Error("policy IDs unreadable: starting afresh; earlier flows' policies will show as unknown", "err", err, "setAside", p+".bad")
	if rerr := os.Rename(p, p+".bad"); rerr != nil {
		a.log.Error("set policy IDs aside", "err", rerr)
	}
	ids, err = netpol.LoadIDs(p)
	if err != nil {
		ids = netpol.NewIDs()
	}
	ids.SkipPolicies(uint32(time.Now().Unix()))
	return ids
}

// policyNamer names the records of the policy datapath from the sync's
// IDs and pod cache.
type policyNamer struct{ *netpol.Syncer }

func (n policyNamer) PolicyName(id uint32) (string, bool) { return n.IDs().PolicyName(id) }

// policyRun is the policy sync plus the reader of its verdict events: both
// stop with the feature.
type policyRun struct {
	*netpol.Syncer
	log       *slog.Logger
	reader    *trace.PolicyReader
	readerErr atomic.Pointer[string]
}

// Run runs the reader beside the sync; a reader that fails leaves
// enforcement running (the trace is not worth a policy outage) and says so
// in the feature's errors.
func (p *policyRun) Run(ctx context.Context) error {
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := p.reader.Run(rctx); err != nil {
			p.log.Error("policy trace reader stopped", "err", err)
			msg := "policy trace reader stopped: " + err.Error()
			p.readerErr.Store(&msg)
		}
	}()
	err := p.Syncer.Run(ctx)
	cancel()
	<-done
	return err
}

// Errors are the sync's errors and the reader's.
func (p *policyRun) Errors() []string {
	out := p.Syncer.Errors()
	if msg := p.readerErr.Load(); msg != nil {
		out = append(out, *msg)
	}
	return out
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
	if r, ok := f.syncer.(*policyRun); ok {
		return r.Syncer
	}
	return nil
}
