package netpol

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
)

// Interfaces finds the host-side interface of a local pod.
type Interfaces interface {
	// IfIndex returns the interface for a pod with these IPs; 0 and no
	// error when it is not there yet.
	IfIndex(ips []netip.Addr) (int, error)
}

// InterfaceWatcher is implemented by Interfaces that can tell when host
// links or routes change (NetlinkInterfaces), so a restarted pod's new
// interface is picked up at once rather than at the next full resync.
type InterfaceWatcher interface {
	Watch(ctx context.Context, notify func()) error
}

// DefaultIntervals bound the policy sync's runner: bursts of events
// coalesce within Min and a policy change still reaches the maps well
// within the 100 ms budget; Max is the period of the full resync that
// repairs drift and retries endpoints left unprogrammed; Retry how soon a
// failed sync is retried (in full).
var DefaultIntervals = apisync.Intervals{Min: 5 * time.Millisecond, Max: time.Minute, Retry: time.Second}

const (
	// interface lookups for a pod that has no interface yet back off from
	// ifaceRetryMin to ifaceRetryMax.
	ifaceRetryMin = 10 * time.Millisecond
	ifaceRetryMax = 2 * time.Second
)

// Options configures a Syncer.
type Options struct {
	apisync.Base
	// NodeIPs are handed to Datapath.SetHostIPs before the first sync.
	NodeIPs []netip.Addr
	// LocalIPs, when set, lists addresses the node holds besides NodeIPs
	// (a pod bridge's gateway, which is the source of the node's traffic to
	// its pods, appears with the node's first pod); every sync adds what it
	// returns to NodeIPs and updates the datapath when the union changed.
	LocalIPs func() ([]netip.Addr, error)
	Datapath dp.Datapath
	// Interfaces nil: NetlinkInterfaces{ScanProc: true}.
	Interfaces Interfaces
	// IDs nil: a fresh allocator (exposed by Syncer.IDs).
	IDs *IDs

	// OnSync, when set, is called after every sync.
	OnSync func(SyncResult)
}

// SyncResult describes one finished sync.
type SyncResult struct {
	Full bool
	Err  error
	// Computed endpoints were recompiled; Applied and Deleted were written.
	Computed, Applied, Deleted int
	Duration                   time.Duration
}

type applied struct {
	uid types.UID
	ep  dp.EndpointPolicy
}

// Syncer keeps the datapath's endpoint policies in step with the API.
type Syncer struct {
	opts    Options
	log     *slog.Logger
	ids     *IDs
	tracker *Tracker
	runner  *apisync.Runner

	podLister corelisters.PodLister
	podIndex  cache.Indexer
	npLister  networkinglisters.NetworkPolicyLister
	nsLister  corelisters.NamespaceLister

	// Owned by the runner goroutine.
	applied    map[types.NamespacedName]applied
	ifaces     map[types.NamespacedName]ifaceCache
	retries    map[types.NamespacedName]int
	hostIPsSet bool
	hostIPs    []netip.Addr // last set, sorted
	adopted    bool         // pinned endpoints of a previous agent taken over

	// synced is closed once the informer caches are synced (Admit waits).
	synced chan struct{}

	// fullSynced: a full sync finished without error (Synced).
	fullSynced atomic.Bool

	mu       sync.Mutex
	problems map[types.NamespacedName]map[string]Problem // per local pod, by Problem.String()
	syncErr  error
	hints    map[types.NamespacedName]hint         // IPs from the CNI plugin (admit.go)
	admits   map[types.NamespacedName][]*admitWait // Admit calls waiting for a sync
}

type ifaceCache struct {
	uid   types.UID
	ips   []netip.Addr
	index int
}

// New checks opts and returns a Syncer; Run starts it.
func New(opts Options) (*Syncer, error) {
	if err := opts.Complete("policy sync", DefaultIntervals); err != nil {
		return nil, err
	}
	if opts.Datapath == nil {
		return nil, errors.New("policy sync: datapath is required")
	}
	if opts.Interfaces == nil {
		opts.Interfaces = defaultInterfaces()
	}
	if opts.IDs == nil {
		opts.IDs = NewIDs()
	}
	s := &Syncer{
		opts:     opts,
		log:      opts.Log,
		ids:      opts.IDs,
		tracker:  NewTracker(),
		applied:  map[types.NamespacedName]applied{},
		ifaces:   map[types.NamespacedName]ifaceCache{},
		retries:  map[types.NamespacedName]int{},
		problems: map[types.NamespacedName]map[string]Problem{},
		synced:   make(chan struct{}),
		hints:    map[types.NamespacedName]hint{},
		admits:   map[types.NamespacedName][]*admitWait{},
	}
	s.runner = apisync.NewRunner(s.sync, opts.Intervals)
	return s, nil
}

// IDs is the policy/endpoint ID allocator: PolicyName maps a verdict's
// policy ID back to namespace/name.
func (s *Syncer) IDs() *IDs { return s.ids }

// Errors are the current problems and the last sync error, for
// NodeState.Status.Errors.
func (s *Syncer) Errors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, ps := range s.problems {
		for name := range ps {
			if !seen[name] {
				seen[name] = true
				out = append(out, name)
			}
		}
	}
	sort.Strings(out)
	if s.syncErr != nil {
		out = append(out, "policy sync: "+s.syncErr.Error())
	}
	if err := s.ids.Err(); err != nil {
		out = append(out, "policy IDs (trace names): "+err.Error())
	}
	return out
}

const (
	nodeIndex = "node"
	ipIndex   = "ip"
)

// CachesSynced is closed once the informer caches are synced: from then on
// PodByIP can name pods.
func (s *Syncer) CachesSynced() <-chan struct{} { return s.synced }

// PodByIP names the pod (not host-network) holding ip, for trace
// enrichment; false when none does or the caches are not synced yet. Of
// several (a finished pod's IP given to a new one), a running one wins.
func (s *Syncer) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	select {
	case <-s.synced:
	default:
		return types.NamespacedName{}, false
	}
	objs, _ := s.podIndex.ByIndex(ipIndex, ip.Unmap().String())
	var best *corev1.Pod
	for _, o := range objs {
		p, ok := o.(*corev1.Pod)
		if !ok {
			continue
		}
		if best == nil || terminal(best) && !terminal(p) {
			best = p
		}
	}
	if best == nil {
		return types.NamespacedName{}, false
	}
	return key(best), true
}

func terminal(p *corev1.Pod) bool {
	return p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// Run starts the informers, waits for their caches and syncs until ctx is
// done. The datapath is left as it is on return: detaching is the feature's
// Disable, not a side effect of stopping.
func (s *Syncer) Run(ctx context.Context) error {
	defer s.opts.StartRecorder(ctx)()
	factory := informers.NewSharedInformerFactory(s.opts.Client, 0)
	podInf := factory.Core().V1().Pods()
	npInf := factory.Networking().V1().NetworkPolicies()
	nsInf := factory.Core().V1().Namespaces()
	// Every pod of the cluster can be a peer, so the pod cache is the big
	// one: keep only what the compiler reads.
	if err := podInf.Informer().SetTransform(stripPod); err != nil {
		return fmt.Errorf("pod informer transform: %w", err)
	}
	if err := podInf.Informer().AddIndexers(cache.Indexers{nodeIndex: func(o any) ([]string, error) {
		if p, ok := o.(*corev1.Pod); ok {
			return []string{p.Spec.NodeName}, nil
		}
		return nil, nil
	}, ipIndex: func(o any) ([]string, error) {
		p, ok := o.(*corev1.Pod)
		if !ok || p.Spec.HostNetwork {
			return nil, nil
		}
		var out []string
		for _, ip := range PodIPs(p) {
			out = append(out, ip.String())
		}
		return out, nil
	}}); err != nil {
		return fmt.Errorf("pod informer index: %w", err)
	}
	s.podLister, s.podIndex = podInf.Lister(), podInf.Informer().GetIndexer()
	s.npLister, s.nsLister = npInf.Lister(), nsInf.Lister()

	if err := errors.Join(
		apisync.Watch(podInf.Informer(), s.tracker.RecordPod, s.runner.Request),
		apisync.Watch(npInf.Informer(), s.tracker.RecordPolicy, s.runner.Request),
		apisync.Watch(nsInf.Informer(), s.tracker.RecordNamespace, s.runner.Request),
	); err != nil {
		return fmt.Errorf("policy informer handler: %w", err)
	}
	stop, err := apisync.StartInformers(ctx, factory)
	defer stop()
	if err != nil {
		return fmt.Errorf("policy sync: %w", err)
	}
	close(s.synced)
	if w, ok := s.opts.Interfaces.(InterfaceWatcher); ok {
		go func() {
			err := w.Watch(ctx, func() {
				s.tracker.RecordInterfaces()
				s.runner.Request()
			})
			if err != nil && ctx.Err() == nil {
				s.log.Warn("interface watch stopped; restarted pods wait for the full resync", "err", err)
			}
		}()
	}
	s.log.Info("policy sync started", "node", s.opts.NodeName)
	s.runner.Loop(ctx)
	return nil
}

func stripPod(o any) (any, error) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return o, nil
	}
	q := &corev1.Pod{
		TypeMeta: p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Namespace: p.Namespace, Name: p.Name, UID: p.UID, Labels: p.Labels,
			ResourceVersion: p.ResourceVersion, DeletionTimestamp: p.DeletionTimestamp},
		Spec: corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork},
		Status: corev1.PodStatus{Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs,
			ContainerStatuses: nil},
	}
	for _, c := range p.Spec.Containers {
		if len(c.Ports) > 0 {
			q.Spec.Containers = append(q.Spec.Containers, corev1.Container{Name: c.Name, Ports: c.Ports})
		}
	}
	return q, nil
}

// listerSource reads the informer caches.
type listerSource struct{ s *Syncer }

func (l listerSource) Policies(ns string) []*networkingv1.NetworkPolicy {
	out, _ := l.s.npLister.NetworkPolicies(ns).List(labels.Everything())
	return out
}

func (l listerSource) Pods(ns string) []*corev1.Pod {
	var out []*corev1.Pod
	if ns == "" {
		out, _ = l.s.podLister.List(labels.Everything())
	} else {
		out, _ = l.s.podLister.Pods(ns).List(labels.Everything())
	}
	// The cache's slice is ours (List copies the pointers): pods the CNI
	// announced before the API has their IPs take their hinted IPs.
	for i, p := range out {
		out[i] = l.s.withHint(p)
	}
	return out
}

func (l listerSource) Namespaces() []*corev1.Namespace {
	out, _ := l.s.nsLister.List(labels.Everything())
	return out
}

func (s *Syncer) localPods() []*corev1.Pod {
	objs, _ := s.podIndex.ByIndex(nodeIndex, s.opts.NodeName)
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		if p, ok := o.(*corev1.Pod); ok {
			out = append(out, p)
		}
	}
	return out
}

// affected lists the local pods whose policy the changes may alter.
func (s *Syncer) affected(c Changes) map[types.NamespacedName]bool {
	out := map[types.NamespacedName]bool{}
	if c.Interfaces {
		for _, p := range s.localPods() {
			out[key(p)] = true
		}
		return out
	}
	for k := range c.Retry {
		out[k] = true
	}
	local := s.localPods()
	selectedBy := func(sel func(*corev1.Pod) bool) {
		for _, p := range local {
			if sel(p) {
				out[key(p)] = true
			}
		}
	}
	// A policy change touches the pods it selects now or selected before.
	for _, ch := range c.Policies {
		for _, p := range []*networkingv1.NetworkPolicy{ch.Prev, ch.Cur} {
			if p != nil {
				selectedBy(func(pod *corev1.Pod) bool { return Selects(p, pod) })
			}
		}
	}
	if len(c.Pods) == 0 && len(c.Namespaces) == 0 {
		return out
	}
	policies, _ := s.npLister.List(labels.Everything())
	nsLabels := map[string]labels.Set{}
	for _, n := range (listerSource{s}).Namespaces() {
		nsLabels[n.Name] = namespaceLabels(n)
	}
	// A pod change touches the pod itself and the local pods of every
	// policy whose peers name it, before or after.
	for k, ch := range c.Pods {
		if (ch.Prev != nil && ch.Prev.Spec.NodeName == s.opts.NodeName) || (ch.Cur != nil && ch.Cur.Spec.NodeName == s.opts.NodeName) {
			out[k] = true
		}
		for _, pol := range policies {
			if (ch.Prev != nil && peersMayName(pol, ch.Prev, nsLabels)) || (ch.Cur != nil && peersMayName(pol, ch.Cur, nsLabels)) {
				selectedBy(func(pod *corev1.Pod) bool { return Selects(pol, pod) })
			}
		}
	}
	// A namespace label change touches policies whose namespaceSelectors
	// match it before or after.
	for _, ch := range c.Namespaces {
		for _, pol := range policies {
			for _, n := range []*corev1.Namespace{ch.Prev, ch.Cur} {
				if n != nil && nsSelectorsMatch(pol, namespaceLabels(n)) {
					selectedBy(func(pod *corev1.Pod) bool { return Selects(pol, pod) })
				}
			}
		}
	}
	return out
}

// eachPeerRule calls f for every rule of p in a direction p enforces.
func eachPeerRule(p *networkingv1.NetworkPolicy, f func(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, egress bool) bool) bool {
	ing, eg := PolicyTypes(p)
	if ing {
		for _, r := range p.Spec.Ingress {
			if f(r.From, r.Ports, false) {
				return true
			}
		}
	}
	if eg {
		for _, r := range p.Spec.Egress {
			if f(r.To, r.Ports, true) {
				return true
			}
		}
	}
	return false
}

// peersMayName: pod (in a namespace with nsLabels) is a peer of some rule of
// pol, or could be one through a named egress port: on a rule without peers,
// or on an ipBlock peer holding one of the pod's IPs.
func peersMayName(pol *networkingv1.NetworkPolicy, pod *corev1.Pod, nsLabels map[string]labels.Set) bool {
	return eachPeerRule(pol, func(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, egress bool) bool {
		named := egress && slices.ContainsFunc(ports, func(p networkingv1.NetworkPolicyPort) bool {
			return p.Port != nil && p.Port.Type == intstr.String
		})
		if len(peers) == 0 {
			return named
		}
		for _, peer := range peers {
			if peer.IPBlock != nil {
				if named {
					// Conservative: a block that does not parse names
					// nothing, and the compiler reports it.
					if a, err := parseIPBlock(peer.IPBlock); err == nil && slices.ContainsFunc(PodIPs(pod), a.holds) {
						return true
					}
				}
				continue
			}
			if peer.PodSelector == nil && peer.NamespaceSelector == nil {
				continue
			}
			if peer.NamespaceSelector == nil {
				if pod.Namespace != pol.Namespace {
					continue
				}
			} else {
				nl, ok := nsLabels[pod.Namespace]
				sel, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
				// A namespace not in the cache yet: its own change will
				// come; assume it may match.
				if err != nil || (ok && !sel.Matches(nl)) {
					continue
				}
			}
			if peer.PodSelector == nil {
				return true
			}
			if sel, err := metav1.LabelSelectorAsSelector(peer.PodSelector); err == nil && sel.Matches(labels.Set(pod.Labels)) {
				return true
			}
		}
		return false
	})
}

func nsSelectorsMatch(pol *networkingv1.NetworkPolicy, nl labels.Set) bool {
	return eachPeerRule(pol, func(peers []networkingv1.NetworkPolicyPeer, _ []networkingv1.NetworkPolicyPort, _ bool) bool {
		for _, peer := range peers {
			if peer.IPBlock != nil || peer.NamespaceSelector == nil {
				continue
			}
			if sel, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector); err == nil && sel.Matches(nl) {
				return true
			}
		}
		return false
	})
}

func key(p *corev1.Pod) types.NamespacedName {
	return types.NamespacedName{Namespace: p.Namespace, Name: p.Name}
}

// sync applies the accumulated changes (all local pods when full).
// syncHostIPs hands the node's addresses to the datapath on the first sync
// and whenever LocalIPs reports a change.
func (s *Syncer) syncHostIPs() error {
	ips := slices.Clone(s.opts.NodeIPs)
	if s.opts.LocalIPs != nil {
		local, err := s.opts.LocalIPs()
		if err != nil {
			// Keep what is programmed: a failed read must not drop an
			// address the node still has.
			s.log.Error("read the node's local addresses", "err", err)
			local = s.hostIPs
		}
		ips = append(ips, local...)
	}
	slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
	ips = slices.Compact(ips)
	if s.hostIPsSet && slices.Equal(ips, s.hostIPs) {
		return nil
	}
	if err := s.opts.Datapath.SetHostIPs(ips); err != nil {
		return fmt.Errorf("set host IPs: %w", err)
	}
	if s.hostIPsSet {
		s.log.Info("node addresses changed", "hostIPs", ips)
	}
	s.hostIPs, s.hostIPsSet = ips, true
	return nil
}

func (s *Syncer) sync(full bool) (err error) {
	start := time.Now()
	res := SyncResult{Full: full}
	defer func() {
		res.Err, res.Duration = err, time.Since(start)
		s.mu.Lock()
		s.syncErr = err
		s.mu.Unlock()
		if full && err == nil {
			s.fullSynced.Store(true)
		}
		if err != nil {
			s.log.Error("policy sync", "full", full, "err", err)
		} else if res.Applied+res.Deleted > 0 || full {
			s.log.Debug("policy sync", "full", full, "computed", res.Computed, "applied", res.Applied,
				"deleted", res.Deleted, "duration", res.Duration)
		}
		if s.opts.OnSync != nil {
			s.opts.OnSync(res)
		}
	}()
	if err := s.syncHostIPs(); err != nil {
		return err
	}
	if !s.adopted {
		if err := s.adoptPinned(); err != nil {
			return err
		}
		s.adopted = true
		full = true
	}
	s.pruneHints()
	compileFailed := map[types.NamespacedName]bool{}
	defer func() { s.finishAdmits(compileFailed) }()
	changes := s.tracker.Take()
	var todo map[types.NamespacedName]bool
	if full {
		todo = map[types.NamespacedName]bool{}
		for _, p := range s.localPods() {
			todo[key(p)] = true
		}
		for k := range s.applied {
			todo[k] = true
		}
		// Interfaces are looked up again: a resync repairs a missed link
		// event too.
		clear(s.ifaces)
	} else {
		if changes.empty() {
			return nil
		}
		todo = s.affected(changes)
		if changes.Interfaces {
			clear(s.ifaces)
		}
	}
	c := &compiler{src: listerSource{s}, ids: s.ids}
	var retry []types.NamespacedName
	var errs []error
	keys := make([]types.NamespacedName, 0, len(todo))
	for k := range todo {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
	for _, k := range keys {
		pod, _ := s.podLister.Pods(k.Namespace).Get(k.Name)
		pod = s.withHint(pod)
		prev, had := s.applied[k]
		if pod == nil || !IsLocalEndpoint(pod, s.opts.NodeName) || (had && prev.uid != pod.UID) {
			if had {
				if err := s.opts.Datapath.DeleteEndpoint(prev.ep.ID); err != nil {
					errs = append(errs, fmt.Errorf("delete endpoint %s: %w", k, err))
					continue
				}
				res.Deleted++
				delete(s.applied, k)
				s.ids.ReleaseEndpoint(prev.uid)
				had = false
			}
			s.setPodProblems(k, nil)
			delete(s.ifaces, k)
			delete(s.retries, k)
			if pod == nil || !IsLocalEndpoint(pod, s.opts.NodeName) {
				continue
			}
		}
		res.Computed++
		ep, problems, ok := c.Endpoint(pod)
		s.setPodProblems(k, problems)
		if !ok {
			// ep is the fail-closed policy (the problem says why): it is
			// programmed, but the pod is not admitted as if all were well.
			compileFailed[k] = true
		}
		idx, err := s.ifIndex(k, pod, ep.IPs)
		if err != nil || idx == 0 {
			if err != nil {
				s.log.Debug("pod interface", "pod", k, "err", err)
			}
			if errors.Is(err, os.ErrPermission) {
				// Not an interface that is not there yet: the agent may not
				// look (no CAP_SYS_ADMIN to enter pod namespaces). Said as a
				// sync error, or the pod would go unenforced in silence.
				errs = append(errs, fmt.Errorf("pod %s unenforced: %w", k, err))
			}
			retry = append(retry, k)
			continue
		}
		ep.IfIndex = idx
		if had && reflect.DeepEqual(prev.ep, ep) {
			continue
		}
		// The policy IDs ep names are on disk before the datapath can write
		// them into events (a failure is reported by Errors, and enforcing
		// matters more than naming).
		s.ids.Save()
		if err := s.opts.Datapath.ApplyEndpoint(ep); err != nil {
			if !errors.Is(err, dp.ErrFull) {
				errs = append(errs, fmt.Errorf("apply endpoint %s: %w", k, err))
				continue
			}
			// The maps are full: fail closed with the smallest policy
			// there is, every enforced direction denying everything
			// (no entries), rather than keep a looser one.
			closed := ep
			closed.Ingress, closed.Egress = nil, nil
			msg := err.Error() + ": every enforced direction of the pod denies all traffic until the maps have room (fail closed)"
			s.setPodProblems(k, append(problems, Problem{Namespace: k.Namespace, Pod: k.Name, Reason: ReasonTooManyRules, Message: msg}))
			compileFailed[k] = true
			if had && reflect.DeepEqual(prev.ep, closed) {
				continue
			}
			if err := s.opts.Datapath.ApplyEndpoint(closed); err != nil {
				errs = append(errs, fmt.Errorf("apply endpoint %s (fail closed): %w", k, err))
				continue
			}
			ep = closed
		}
		res.Applied++
		s.applied[k] = applied{uid: pod.UID, ep: ep}
	}
	for k, ch := range changes.Policies {
		if ch.Cur == nil {
			s.ids.ReleasePolicy(k.Namespace, k.Name)
		}
	}
	s.ids.Save()
	s.scheduleRetries(retry)
	return errors.Join(errs...)
}

// ifIndex returns the pod's interface, cached until the pod's UID or IPs
// change or links change.
func (s *Syncer) ifIndex(k types.NamespacedName, pod *corev1.Pod, ips []netip.Addr) (int, error) {
	if c, ok := s.ifaces[k]; ok && c.uid == pod.UID && slices.Equal(c.ips, ips) {
		return c.index, nil
	}
	idx, err := s.opts.Interfaces.IfIndex(ips)
	if err != nil || idx == 0 {
		return 0, err
	}
	s.ifaces[k] = ifaceCache{uid: pod.UID, ips: ips, index: idx}
	delete(s.retries, k)
	return idx, nil
}

// scheduleRetries looks again for interfaces that were not there, backing
// off per pod: the pod's IP is usually in the API a moment before its
// routes are, or the other way round.
func (s *Syncer) scheduleRetries(keys []types.NamespacedName) {
	if len(keys) == 0 {
		return
	}
	delay := ifaceRetryMax
	for _, k := range keys {
		n := s.retries[k]
		s.retries[k] = n + 1
		delay = min(delay, ifaceRetryMin<<min(n, 10))
	}
	time.AfterFunc(delay, func() {
		s.tracker.RecordRetry(keys)
		s.runner.Request()
	})
}

// setPodProblems replaces the problems met compiling one pod and raises an
// Event for each that no pod had before.
func (s *Syncer) setPodProblems(k types.NamespacedName, problems []Problem) {
	s.mu.Lock()
	defer s.mu.Unlock()
	known := map[string]bool{}
	for pk, ps := range s.problems {
		if pk == k {
			continue
		}
		for name := range ps {
			known[name] = true
		}
	}
	if len(problems) == 0 {
		delete(s.problems, k)
		return
	}
	prev := s.problems[k]
	fresh := map[string]Problem{}
	for _, p := range problems {
		name := p.String()
		fresh[name] = p
		if _, ok := prev[name]; !ok && !known[name] {
			s.event(p)
		}
	}
	s.problems[k] = fresh
}

func (s *Syncer) event(p Problem) {
	if s.opts.Recorder == nil {
		return
	}
	s.log.Warn("network policy problem", "problem", p.String())
	if p.Pod != "" {
		ref := &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: p.Namespace, Name: p.Pod}
		s.opts.Recorder.Event(ref, corev1.EventTypeWarning, p.Reason, p.Message)
		return
	}
	if ns, name, ok := splitKey(p.Policy); ok {
		ref := &corev1.ObjectReference{Kind: "NetworkPolicy", APIVersion: "networking.k8s.io/v1", Namespace: ns, Name: name}
		s.opts.Recorder.Event(ref, corev1.EventTypeWarning, p.Reason, p.Message)
	}
}

func splitKey(k string) (string, string, bool) {
	for i := range len(k) {
		if k[i] == '/' {
			return k[:i], k[i+1:], true
		}
	}
	return "", "", false
}
