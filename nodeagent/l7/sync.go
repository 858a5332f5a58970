// Package l7 is the agent's L7 sync: it turns L7Policies and pods into the
// configuration of this node's Envoy (served by xds.Server) and programs the
// steering datapath (bpf/sockmap): which local pod:ports connections are
// steered to Envoy, where Envoy listens, and which cgroup is Envoy's.
//
// The destination's node enforces (bpf/sockmap README, "Multi-node"): the
// agent builds filter chains and steering entries for the pods of its own
// node only (xds.Options.LocalDestinationsOnly).
//
// Informer handlers only request a run; the one runner rebuilds the whole
// input from the listers (Build is pure and versions by content, so an
// unrelated change sends Envoy nothing), applies it, and writes status.
package l7

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// Datapath is the steering map layer (bpf/sockmap through an adapter).
type Datapath interface {
	SetSteered(dst netip.AddrPort) error
	DeleteSteered(dst netip.AddrPort) error
	Steered() ([]netip.AddrPort, error)
	// SetEnvoyListener turns steering on towards listener; the zero value
	// turns it off: connects to steered destinations then fail (EPERM).
	SetEnvoyListener(listener netip.AddrPort) error
	// AddEnvoyCgroup exempts sockets of the cgroup id and its descendants.
	AddEnvoyCgroup(id uint64) error
	DeleteEnvoyCgroup(id uint64) error
}

// DefaultIntervals: Min coalesces bursts (a rollout changes many pods);
// Max is the full resync that repairs drift; Retry after a failure.
var DefaultIntervals = apisync.Intervals{Min: 10 * time.Millisecond, Max: time.Minute, Retry: time.Second}

// DefaultListenPort is Envoy's listener port on the node address.
const DefaultListenPort = manifests.EnvoyListenPort

// Options configure a Syncer.
type Options struct {
	apisync.Base
	// API reads L7Policies and writes their status.
	API      versioned.Interface
	Datapath Datapath
	// Server serves the node's Envoy; the Syncer sets its snapshots.
	Server *xds.Server
	// Namespace holds the Envoy DaemonSet's pods.
	Namespace string
	// CgroupRoot is the cgroup v2 mount the Envoy pod's cgroup is found under.
	CgroupRoot string
	// ListenPort (default DefaultListenPort) on the node's InternalIP.
	ListenPort uint16
	// XDS are the builder options; ListenAddress and LocalDestinationsOnly
	// are set by the Syncer.
	XDS xds.Options
}

// Syncer keeps Envoy's configuration, the steering maps and the status of
// L7Policies in step with the API.
type Syncer struct {
	opts   Options
	log    *slog.Logger
	runner *apisync.Runner
	ctx    context.Context

	podLister  corelisters.PodLister
	nsLister   corelisters.NamespaceLister
	nodeLister corelisters.NodeLister
	polLister  cache.Indexer

	// Owned by the runner goroutine.
	steered      map[netip.AddrPort]bool
	envoyCgroups map[types.UID]uint64 // Envoy pod -> its registered cgroup id
	envoyOn      netip.AddrPort

	mu       sync.Mutex
	status   v1alpha1.L7NodeStatus
	syncErr  string
	envoyErr string
}

// New checks opts; Run starts the Syncer.
func New(opts Options) (*Syncer, error) {
	if err := opts.Complete("l7 sync", DefaultIntervals); err != nil {
		return nil, err
	}
	if opts.API == nil || opts.Datapath == nil || opts.Server == nil || opts.Namespace == "" || opts.CgroupRoot == "" {
		return nil, errors.New("l7 sync: API client, datapath, xDS server, namespace and cgroup root are required")
	}
	if opts.ListenPort == 0 {
		opts.ListenPort = DefaultListenPort
	}
	s := &Syncer{opts: opts, log: opts.Log, steered: map[netip.AddrPort]bool{}, envoyCgroups: map[types.UID]uint64{}}
	s.runner = apisync.NewRunner(s.sync, opts.Intervals)
	return s, nil
}

// Request asks for a sync (the xDS server calls it when Envoy ACKs or NACKs).
func (s *Syncer) Request() { s.runner.Request() }

// Run watches the API and syncs until ctx ends. The datapath is left as it
// is on return: steering keeps working through an agent restart.
func (s *Syncer) Run(ctx context.Context) error {
	s.ctx = ctx
	defer s.opts.StartRecorder(ctx)()
	factory := informers.NewSharedInformerFactory(s.opts.Client, 0)
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(s.opts.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", s.opts.NodeName).String()
		}))
	podInf := factory.Core().V1().Pods()
	nsInf := factory.Core().V1().Namespaces()
	nodeInf := nodeFactory.Core().V1().Nodes()
	polInf := policyInformer(s.opts.API)
	s.podLister, s.nsLister, s.nodeLister, s.polLister = podInf.Lister(), nsInf.Lister(), nodeInf.Lister(), polInf.GetIndexer()

	if err := errors.Join(
		apisync.Watch(podInf.Informer(), func(_, _ *corev1.Pod) bool { return true }, s.runner.Request),
		apisync.Watch(nsInf.Informer(), func(_, _ *corev1.Namespace) bool { return true }, s.runner.Request),
		apisync.Watch(nodeInf.Informer(), func(_, _ *corev1.Node) bool { return true }, s.runner.Request),
		apisync.Watch(polInf, func(_, _ *v1alpha1.L7Policy) bool { return true }, s.runner.Request),
	); err != nil {
		return fmt.Errorf("l7 sync informer handler: %w", err)
	}
	go polInf.Run(ctx.Done())
	stop, err := apisync.StartInformers(ctx, factory, nodeFactory)
	defer stop()
	if err == nil && !cache.WaitForCacheSync(ctx.Done(), polInf.HasSynced) {
		err = errors.New("informer l7policies: cache not synced")
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	s.log.Info("l7 sync caches ready; starting sync", "node", s.opts.NodeName)
	s.runner.Loop(ctx)
	return nil
}

// policyInformer watches L7Policies in every namespace through the typed
// client (client-gen made no informers for our group).
func policyInformer(c versioned.Interface) cache.SharedIndexInformer {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return c.EbpfV1alpha1().L7Policies(metav1.NamespaceAll).List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return c.EbpfV1alpha1().L7Policies(metav1.NamespaceAll).Watch(ctx, o)
		},
	}
	// The wrapper tells the reflector whether c streams lists (WatchList):
	// fake clientsets do not.
	return cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, c), &v1alpha1.L7Policy{}, 0, cache.Indexers{})
}

// Status is the node's L7 state for NodeState.
func (s *Syncer) Status() v1alpha1.L7NodeStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Errors lists what keeps L7 from working on this node.
func (s *Syncer) Errors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, e := range []string{s.syncErr, s.envoyErr} {
		if e != "" {
			out = append(out, e)
		}
	}
	return out
}

func (s *Syncer) sync(full bool) error {
	err := s.apply(full)
	s.mu.Lock()
	if err != nil {
		s.syncErr = fmt.Sprintf("l7 sync: %v (retry in %s)", err, s.opts.Intervals.Retry)
	} else {
		s.syncErr = ""
	}
	s.mu.Unlock()
	if err != nil {
		s.log.Error("l7 sync", "err", err)
	}
	return err
}

func (s *Syncer) apply(full bool) error {
	node, err := s.nodeLister.Get(s.opts.NodeName)
	if err != nil {
		return fmt.Errorf("node %s: %w", s.opts.NodeName, err)
	}
	listen, ok := nodeListener(node, s.opts.ListenPort)
	if !ok {
		return fmt.Errorf("node %s has no IPv4 address for Envoy's listener", s.opts.NodeName)
	}
	var policies []*v1alpha1.L7Policy
	for _, o := range s.polLister.List() {
		policies = append(policies, o.(*v1alpha1.L7Policy))
	}
	pods, err := s.podLister.List(labels.Everything())
	if err != nil {
		return err
	}
	nss, err := s.nsLister.List(labels.Everything())
	if err != nil {
		return err
	}
	valid, invalid := accepted(policies)
	opts := s.opts.XDS
	opts.ListenAddress, opts.LocalDestinationsOnly = listen, true
	res, rejected := s.build(input(valid, pods, nss), opts)
	for k, msg := range rejected {
		invalid[k] = msg
	}
	if err := s.opts.Server.Update(s.ctx, s.opts.NodeName, res); err != nil {
		return err
	}

	// Envoy's identity before any steering towards it: its own upstream
	// connections must never be steered back to itself.
	envoyReady := s.syncEnvoyCgroup(pods)
	want := map[netip.AddrPort]bool{}
	for _, d := range res.Destinations {
		want[d.Addr] = true
	}
	if err := s.syncSteered(want, full); err != nil {
		return err
	}
	on := netip.AddrPort{}
	if envoyReady {
		on = listen
	}
	if on != s.envoyOn || full {
		if err := s.opts.Datapath.SetEnvoyListener(on); err != nil {
			return err
		}
		if on != s.envoyOn {
			s.log.Info("steering to envoy", "on", on.IsValid(), "listener", listen)
		}
		s.envoyOn = on
	}

	st := s.opts.Server.Status(s.opts.NodeName)
	s.mu.Lock()
	s.status = v1alpha1.L7NodeStatus{
		EnvoyReady: envoyReady, Version: st.Version, AckedVersion: st.AckedVersion,
		NackedVersion: st.NackedVersion, NackMessage: truncate(st.Message),
		Steered: int32(len(want)), Policies: int32(len(res.Policies)),
	}
	s.mu.Unlock()
	return s.writeStatuses(policies, invalid, res)
}

// build makes the node's configuration. A policy Build refuses although it
// passed validation is left out (and reported on its status), so one bad
// object never takes the others' enforcement down.
func (s *Syncer) build(in xds.Input, opts xds.Options) (*xds.Resources, map[string]string) {
	rejected := map[string]string{}
	for {
		res, err := xds.Build(in, s.opts.NodeName, opts)
		if err == nil {
			return res, rejected
		}
		bad := -1
		for i, p := range in.Policies {
			one := in
			one.Policies = []*v1alpha1.L7Policy{p}
			if _, perr := xds.Build(one, s.opts.NodeName, opts); perr != nil {
				bad = i
				rejected[p.Namespace+"/"+p.Name] = perr.Error()
				break
			}
		}
		if bad < 0 {
			// Only the combination fails: serve no policy rather than a
			// stale one, and say so (every destination then fails closed
			// through the default chain).
			s.log.Error("l7 build failed for the combination of policies", "err", err)
			for _, p := range in.Policies {
				rejected[p.Namespace+"/"+p.Name] = err.Error()
			}
			in.Policies = nil
			continue
		}
		in.Policies = slices.Delete(slices.Clone(in.Policies), bad, bad+1)
	}
}

// syncEnvoyCgroup registers the cgroup of every Envoy pod on this node
// (during a rollout the old one drains beside the new one: its upstream
// connects must not be steered either) and reports whether steering may be
// on: an Envoy pod whose containers are ready (draining ones too, see
// podReady) and whose cgroup is registered.
func (s *Syncer) syncEnvoyCgroup(pods []*corev1.Pod) bool {
	var errs []string
	ready := false
	seen := map[types.UID]bool{}
	for _, p := range pods {
		if !isEnvoy(p, s.opts.Namespace, s.opts.NodeName) || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		seen[p.UID] = true
		if _, ok := s.envoyCgroups[p.UID]; !ok {
			dir, err := podCgroup(s.opts.CgroupRoot, string(p.UID))
			var id uint64
			if err == nil {
				id, err = cgroupID(dir)
			}
			if err == nil {
				err = s.opts.Datapath.AddEnvoyCgroup(id)
			}
			if err != nil {
				// Without its cgroup Envoy's upstream connects would loop
				// back to itself: no steering to it (fail closed). A pod
				// still starting has no cgroup yet; only a Ready one is
				// worth an error.
				if podReady(p) {
					errs = append(errs, "envoy pod "+p.Name+": "+err.Error())
				}
				continue
			}
			s.log.Info("envoy cgroup registered", "pod", p.Name, "cgroup", dir, "id", id)
			s.envoyCgroups[p.UID] = id
		}
		if podReady(p) {
			ready = true
		}
	}
	for uid, id := range s.envoyCgroups {
		if !seen[uid] {
			if err := s.opts.Datapath.DeleteEnvoyCgroup(id); err != nil {
				errs = append(errs, err.Error())
				continue
			}
			delete(s.envoyCgroups, uid)
		}
	}
	s.mu.Lock()
	s.envoyErr = strings.Join(errs, "; ")
	s.mu.Unlock()
	return ready
}

// syncSteered makes the steered set want; on a full sync it reads the map
// back (an earlier agent's entries, drift).
func (s *Syncer) syncSteered(want map[netip.AddrPort]bool, full bool) error {
	if full {
		have, err := s.opts.Datapath.Steered()
		if err != nil {
			return err
		}
		s.steered = map[netip.AddrPort]bool{}
		for _, a := range have {
			s.steered[a] = true
		}
	}
	var errs []error
	for a := range want {
		if !s.steered[a] {
			if err := s.opts.Datapath.SetSteered(a); err != nil {
				errs = append(errs, err)
				continue
			}
			s.steered[a] = true
		}
	}
	for a := range s.steered {
		if !want[a] {
			if err := s.opts.Datapath.DeleteSteered(a); err != nil {
				errs = append(errs, err)
				continue
			}
			delete(s.steered, a)
		}
	}
	return errors.Join(errs...)
}

// writeStatuses writes every policy's status whose computed value differs.
func (s *Syncer) writeStatuses(policies []*v1alpha1.L7Policy, invalid map[string]string, res *xds.Resources) error {
	var errs []error
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	for _, p := range policies {
		key := p.Namespace + "/" + p.Name
		desired := func(p *v1alpha1.L7Policy) (v1alpha1.L7PolicyStatus, bool) {
			var entry *v1alpha1.L7PolicyNodeStatus
			if _, ok := res.Policies[key]; ok && invalid[key] == "" {
				e, ok := s.opts.Server.PolicyStatus(s.opts.NodeName, key, p.Generation)
				if ok {
					e.Message = truncate(e.Message)
					entry = &e
				}
			}
			return policyStatus(p, s.opts.NodeName, invalid[key], entry, now)
		}
		if _, changed := desired(p); !changed {
			continue
		}
		err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := s.opts.API.EbpfV1alpha1().L7Policies(p.Namespace).Get(s.ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			st, changed := desired(cur)
			if !changed {
				return nil
			}
			cur.Status = st
			_, err = s.opts.API.EbpfV1alpha1().L7Policies(p.Namespace).UpdateStatus(s.ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("status of l7policy %s: %w", key, err))
		}
	}
	return errors.Join(errs...)
}
