package servicelb

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
)

// Datapath is the socket LB map layer the sync programs: socklb's contract
// plus reading back what is programmed, which a full resync reconciles
// against (and takes service IDs over from, after an agent restart).
type Datapath interface {
	socklb.Datapath
	Services() (map[uint32]socklb.Service, error)
}

// Event reasons recorded on Services.
const (
	ReasonMapFull = "ServiceLBMapFull"
)

// Label selectors as kube-proxy uses them: Services handed to another proxy
// implementation are not ours, and headless Services have nothing to
// translate (their slices would only cost memory).
const (
	labelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	serviceSelector       = "!" + labelServiceProxyName
	sliceSelector         = "!" + labelServiceProxyName + ",!" + v1.IsHeadlessService
)

// DefaultIntervals bound the service sync's runner. Min is small because
// one endpoint change must reach the maps well within 50ms; bursts of
// events still coalesce into one sync. Max is the period of the full resync
// that repairs any drift between the caches and the maps; Retry how soon a
// failed sync is retried, as a full resync.
var DefaultIntervals = apisync.Intervals{Min: 2 * time.Millisecond, Max: time.Minute, Retry: time.Second}

// Options configures a Syncer.
type Options struct {
	apisync.Base
	Datapath Datapath
	// Metrics nil: unregistered metrics are used.
	Metrics *Metrics

	// OnSync, when set, is called after every sync (tests and benchmarks
	// use it to see a change land).
	OnSync func(SyncResult)
}

// SyncResult describes one finished sync.
type SyncResult struct {
	Full     bool
	Err      error
	Duration time.Duration
	// Applied and Deleted count datapath writes.
	Applied, Deleted int
}

// Syncer keeps the datapath in step with the API.
type Syncer struct {
	opts    Options
	log     *slog.Logger
	tracker *Tracker
	runner  *apisync.Runner

	svcLister   corelisters.ServiceLister
	sliceLister discoverylisters.EndpointSliceLister
	nodeLister  corelisters.NodeLister

	// Owned by the runner goroutine.
	services   map[types.NamespacedName]*v1.Service
	slices     map[types.NamespacedName]map[types.NamespacedName]*discovery.EndpointSlice // by Service, then slice
	sliceOwner map[types.NamespacedName]types.NamespacedName                              // slice -> Service
	node       NodeInfo
	programmed map[PortKey]socklb.Service
	bySvc      map[types.NamespacedName]map[PortKey]struct{}
	ids        map[PortKey]uint32
	idOwner    map[uint32]PortKey
	nextID     uint32
	needFull   bool

	// idMu guards writes of ids/idOwner (the runner's) against PortByID
	// (the trace reader's); the runner reads them without it.
	idMu sync.RWMutex

	mu       sync.Mutex
	fullErrs map[types.NamespacedName]string // Services left unprogrammed for lack of room
	syncErr  string
	synced   bool
}

// New checks opts and returns a Syncer; Run starts it.
func New(opts Options) (*Syncer, error) {
	if err := opts.Complete("service sync", DefaultIntervals); err != nil {
		return nil, err
	}
	if opts.Datapath == nil {
		return nil, errors.New("service sync: datapath is required")
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	s := &Syncer{
		opts:       opts,
		log:        opts.Log,
		tracker:    NewTracker(),
		services:   map[types.NamespacedName]*v1.Service{},
		slices:     map[types.NamespacedName]map[types.NamespacedName]*discovery.EndpointSlice{},
		sliceOwner: map[types.NamespacedName]types.NamespacedName{},
		programmed: map[PortKey]socklb.Service{},
		bySvc:      map[types.NamespacedName]map[PortKey]struct{}{},
		ids:        map[PortKey]uint32{},
		idOwner:    map[uint32]PortKey{},
		nextID:     1,
		needFull:   true,
		fullErrs:   map[types.NamespacedName]string{},
	}
	s.runner = apisync.NewRunner(s.sync, opts.Intervals)
	return s, nil
}

// Run starts the informers, waits for their caches and syncs until ctx is
// done. It leaves the datapath as it is on return.
func (s *Syncer) Run(ctx context.Context) error {
	defer s.opts.StartRecorder(ctx)()
	svcFactory := informers.NewSharedInformerFactoryWithOptions(s.opts.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = serviceSelector }))
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(s.opts.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sliceSelector }))
	// Every Node: NodePorts are reached at any node's address.
	nodeFactory := informers.NewSharedInformerFactory(s.opts.Client, 0)

	svcInf := svcFactory.Core().V1().Services()
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices()
	nodeInf := nodeFactory.Core().V1().Nodes()
	s.svcLister, s.sliceLister, s.nodeLister = svcInf.Lister(), sliceInf.Lister(), nodeInf.Lister()

	if err := errors.Join(
		apisync.Watch(svcInf.Informer(), s.tracker.RecordService, s.runner.Request),
		apisync.Watch(sliceInf.Informer(), s.tracker.RecordSlice, s.runner.Request),
		apisync.Watch(nodeInf.Informer(), s.tracker.RecordNode, s.runner.Request),
	); err != nil {
		return fmt.Errorf("service sync informer handler: %w", err)
	}
	stop, err := apisync.StartInformers(ctx, svcFactory, sliceFactory, nodeFactory)
	defer stop()
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	s.log.Info("service sync caches ready; starting sync", "node", s.opts.NodeName)
	s.runner.Loop(ctx)
	return nil
}

// Synced reports whether the first full sync has succeeded.
func (s *Syncer) Synced() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced
}

// Errors lists the problems to report in NodeState, sorted: Services that
// did not fit the maps and the last sync failure, if not yet recovered.
func (s *Syncer) Errors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	if s.syncErr != "" {
		out = append(out, s.syncErr)
	}
	full := slices.Sorted(maps.Values(s.fullErrs))
	return append(out, full...)
}

// sync is the runner's function: a full resync when asked for by the timer
// or after a failure, else the delta.
func (s *Syncer) sync(periodic bool) error {
	start := time.Now()
	full := periodic || s.needFull
	var res SyncResult
	var err error
	if full {
		res, err = s.fullSync()
	} else {
		res, err = s.partialSync()
	}
	res.Full, res.Err, res.Duration = full, err, time.Since(start)
	kind := "partial"
	if full {
		kind = "full"
	}
	s.opts.Metrics.SyncDuration.WithLabelValues(kind).Observe(res.Duration.Seconds())
	s.opts.Metrics.Programmed.Set(float64(len(s.programmed)))

	s.mu.Lock()
	if err != nil {
		s.needFull = true
		s.syncErr = fmt.Sprintf("service sync: %v (full resync in %s)", err, s.opts.Intervals.Retry)
	} else {
		s.syncErr = ""
		if full {
			s.synced = true
		}
	}
	s.mu.Unlock()
	if err != nil {
		s.opts.Metrics.SyncErrors.WithLabelValues("datapath").Inc()
		s.log.Error("service sync", "full", full, "err", err)
	} else if res.Applied+res.Deleted > 0 || full {
		s.log.Debug("service sync", "full", full, "applied", res.Applied, "deleted", res.Deleted,
			"programmed", len(s.programmed), "took", res.Duration)
	}
	if s.opts.OnSync != nil {
		s.opts.OnSync(res)
	}
	return err
}

// partialSync applies the tracker's changes to the local view and
// reprograms only the Services they touch.
func (s *Syncer) partialSync() (SyncResult, error) {
	c := s.tracker.Take()
	touched := map[types.NamespacedName]struct{}{}
	for k, svc := range c.Services {
		if svc == nil {
			delete(s.services, k)
		} else {
			s.services[k] = svc
		}
		touched[k] = struct{}{}
	}
	for k, sl := range c.Slices {
		if owner, ok := s.sliceOwner[k]; ok {
			delete(s.slices[owner], k)
			if len(s.slices[owner]) == 0 {
				delete(s.slices, owner)
			}
			delete(s.sliceOwner, k)
			touched[owner] = struct{}{}
		}
		if sl != nil {
			if owner, ok := sliceService(sl); ok {
				s.addSlice(owner, k, sl)
				touched[owner] = struct{}{}
			}
		}
	}
	if c.Nodes {
		s.node = s.nodeInfo()
		for k, svc := range s.services {
			if usesNodeIPs(svc) {
				touched[k] = struct{}{}
			}
		}
	}
	// Services that did not fit last time get another chance whenever
	// anything syncs: a delete elsewhere may have made room.
	s.mu.Lock()
	for k := range s.fullErrs {
		touched[k] = struct{}{}
	}
	s.mu.Unlock()
	if len(touched) == 0 {
		return SyncResult{}, nil
	}
	return s.reconcile(touched)
}

func (s *Syncer) addSlice(owner, k types.NamespacedName, sl *discovery.EndpointSlice) {
	m := s.slices[owner]
	if m == nil {
		m = map[types.NamespacedName]*discovery.EndpointSlice{}
		s.slices[owner] = m
	}
	m[k] = sl
	s.sliceOwner[k] = owner
}

func sliceService(sl *discovery.EndpointSlice) (types.NamespacedName, bool) {
	name := sl.Labels[discovery.LabelServiceName]
	return types.NamespacedName{Namespace: sl.Namespace, Name: name}, name != ""
}

// nodeInfo is this node's name and addresses and every other node's, from
// the Node cache.
func (s *Syncer) nodeInfo() NodeInfo {
	nodes, err := s.nodeLister.List(labels.Everything())
	if err != nil {
		s.log.Warn("list nodes; NodePort frontends omitted", "err", err)
		return NodeInfo{Name: s.opts.NodeName}
	}
	ni := NodeInfoFromNodes(s.opts.NodeName, nodes)
	if len(ni.IPs) == 0 {
		// NodePorts need the node's IPs; without them the rest still works.
		s.log.Warn("own node not in cache or without InternalIP; its NodePort frontends omitted", "node", s.opts.NodeName)
	}
	return ni
}

func usesNodeIPs(svc *v1.Service) bool {
	return svc.Spec.Type == v1.ServiceTypeNodePort || svc.Spec.Type == v1.ServiceTypeLoadBalancer
}

// fullSync rebuilds the local view from the informer caches and reconciles
// the datapath's actual content against it. Only entries that differ are
// written, so a periodic full sync of an unchanged cluster writes nothing.
func (s *Syncer) fullSync() (SyncResult, error) {
	// Take first: a change recorded after this point is already in the
	// caches listed below and will be applied again by the next partial
	// sync, which is harmless; the reverse order could lose it.
	s.tracker.Take()
	svcs, err := s.svcLister.List(labels.Everything())
	if err != nil {
		return SyncResult{}, fmt.Errorf("list services: %w", err)
	}
	sls, err := s.sliceLister.List(labels.Everything())
	if err != nil {
		return SyncResult{}, fmt.Errorf("list endpointslices: %w", err)
	}
	s.services = make(map[types.NamespacedName]*v1.Service, len(svcs))
	for _, svc := range svcs {
		s.services[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}] = svc
	}
	s.slices = map[types.NamespacedName]map[types.NamespacedName]*discovery.EndpointSlice{}
	s.sliceOwner = map[types.NamespacedName]types.NamespacedName{}
	for _, sl := range sls {
		if owner, ok := sliceService(sl); ok {
			s.addSlice(owner, types.NamespacedName{Namespace: sl.Namespace, Name: sl.Name}, sl)
		}
	}
	s.mu.Lock()
	for name := range s.fullErrs {
		if _, ok := s.services[name]; !ok {
			delete(s.fullErrs, name)
		}
	}
	s.mu.Unlock()
	s.node = s.nodeInfo()

	actual, err := s.opts.Datapath.Services()
	if err != nil {
		return SyncResult{}, fmt.Errorf("read datapath services: %w", err)
	}
	// IDs must never collide with what is in the maps, ours or a previous
	// agent's.
	for id := range actual {
		if id >= s.nextID {
			s.nextID = id + 1
		}
	}

	touched := make(map[types.NamespacedName]struct{}, len(s.services))
	for k := range s.services {
		touched[k] = struct{}{}
	}
	desired := s.desired(touched)

	// Adopt the IDs a previous agent gave these ports: the frontend
	// (ClusterIP:port/proto) identifies a port cluster-wide. Only IDs this
	// agent never handed out are adopted, so an ID never moves between
	// two ports within one agent lifetime.
	byFrontend := map[socklb.Frontend]uint32{}
	for id, svc := range actual {
		if _, mine := s.idOwner[id]; mine {
			continue
		}
		for _, fe := range svc.Frontends {
			byFrontend[fe] = id
		}
	}
	for _, k := range sortedKeys(desired) {
		if _, ok := s.ids[k]; ok {
			continue
		}
		for _, fe := range desired[k].Frontends {
			if id, ok := byFrontend[fe]; ok {
				if _, taken := s.idOwner[id]; !taken {
					s.assignID(k, id)
					break
				}
			}
		}
	}

	// Rebuild "programmed" from what the maps really hold.
	var res SyncResult
	s.programmed = map[PortKey]socklb.Service{}
	s.bySvc = map[types.NamespacedName]map[PortKey]struct{}{}
	wanted := map[uint32]bool{}
	for k := range desired {
		if id, ok := s.ids[k]; ok {
			wanted[id] = true
		}
	}
	for id, svc := range actual {
		if k, ok := s.idOwner[id]; ok && wanted[id] {
			s.setProgrammed(k, svc)
			continue
		}
		// Removed while we were not looking, or never ours to keep.
		if err := s.opts.Datapath.Delete(id); err != nil {
			return res, fmt.Errorf("delete stale service %d: %w", id, err)
		}
		res.Deleted++
	}
	// Programmed entries whose Service is gone are handled by reconcile as
	// deletes; entries of Services that still exist are compared there.
	r, err := s.reconcileDesired(touched, desired)
	res.Applied += r.Applied
	res.Deleted += r.Deleted
	if err != nil {
		return res, err
	}
	s.needFull = false
	return res, nil
}

func sortedKeys(m map[PortKey]socklb.Service) []PortKey {
	ks := slices.Collect(maps.Keys(m))
	slices.SortFunc(ks, comparePortKey)
	return ks
}

func comparePortKey(a, b PortKey) int {
	return cmp.Or(cmp.Compare(a.Service.Namespace, b.Service.Namespace), cmp.Compare(a.Service.Name, b.Service.Name),
		cmp.Compare(a.PortName, b.PortName), cmp.Compare(a.Proto, b.Proto),
		cmp.Compare(boolInt(a.IPv6), boolInt(b.IPv6)), cmp.Compare(a.Scope, b.Scope))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (s *Syncer) setProgrammed(k PortKey, svc socklb.Service) {
	s.programmed[k] = normalize(svc)
	m := s.bySvc[k.Service]
	if m == nil {
		m = map[PortKey]struct{}{}
		s.bySvc[k.Service] = m
	}
	m[k] = struct{}{}
}

func (s *Syncer) unsetProgrammed(k PortKey) {
	delete(s.programmed, k)
	if m := s.bySvc[k.Service]; m != nil {
		delete(m, k)
		if len(m) == 0 {
			delete(s.bySvc, k.Service)
		}
	}
}

// desired translates the given Services from the local view.
func (s *Syncer) desired(names map[types.NamespacedName]struct{}) map[PortKey]socklb.Service {
	out := map[PortKey]socklb.Service{}
	for name := range names {
		svc := s.services[name]
		if svc == nil {
			continue
		}
		var sls []*discovery.EndpointSlice
		for _, sl := range s.slices[name] {
			sls = append(sls, sl)
		}
		maps.Copy(out, Translate(svc, sls, s.node))
	}
	return out
}

func (s *Syncer) reconcile(names map[types.NamespacedName]struct{}) (SyncResult, error) {
	return s.reconcileDesired(names, s.desired(names))
}

func (s *Syncer) assignID(k PortKey, id uint32) {
	s.idMu.Lock()
	s.ids[k], s.idOwner[id] = id, k
	s.idMu.Unlock()
}

// PortByID names the Service port a datapath service ID stands for (the
// trace names socket LB events with it). IDs are never reused within one
// agent lifetime, so a recently deleted port's events are still named.
// IDs a previous agent gave ports this one has not seen are unknown.
func (s *Syncer) PortByID(id uint32) (PortKey, bool) {
	s.idMu.RLock()
	defer s.idMu.RUnlock()
	k, ok := s.idOwner[id]
	return k, ok
}

// idFor returns the port's ID, allocating a fresh one the first time. IDs
// are never recycled within one agent lifetime.
func (s *Syncer) idFor(k PortKey) uint32 {
	if id, ok := s.ids[k]; ok {
		return id
	}
	for {
		id := s.nextID
		s.nextID++
		if id == 0 {
			continue
		}
		if _, used := s.idOwner[id]; used {
			continue
		}
		s.assignID(k, id)
		return id
	}
}

// reconcileDesired makes the datapath hold desired for the named Services.
// Deletes go first: they free room, and a frontend moving from one port to
// another must be deleted from the old one before the new one claims it.
// Each Service is then checked against the maps' free capacity as a whole
// and, when it does not fit, not written at all.
func (s *Syncer) reconcileDesired(names map[types.NamespacedName]struct{}, desired map[PortKey]socklb.Service) (SyncResult, error) {
	var res SyncResult
	for name := range names {
		for k := range s.bySvc[name] {
			if _, ok := desired[k]; ok {
				continue
			}
			if err := s.opts.Datapath.Delete(s.programmed[k].ID); err != nil {
				return res, fmt.Errorf("delete %s (id %d): %w", k, s.programmed[k].ID, err)
			}
			s.unsetProgrammed(k)
			res.Deleted++
		}
	}
	// A Service that is gone no longer waits for room.
	for name := range names {
		if _, ok := s.services[name]; ok {
			continue
		}
		s.clearFull(name)
	}

	byName := map[types.NamespacedName][]PortKey{}
	for k := range desired {
		byName[k.Service] = append(byName[k.Service], k)
	}
	order := slices.Collect(maps.Keys(byName))
	sort.Slice(order, func(i, j int) bool { return order[i].String() < order[j].String() })

	freeF, freeB := s.opts.Datapath.Capacity()
	for _, name := range order {
		keys := byName[name]
		slices.SortFunc(keys, comparePortKey)
		var needF, needB int
		var todo []socklb.Service
		var todoKeys []PortKey
		for _, k := range keys {
			want := desired[k]
			want.ID = s.idFor(k)
			if cur, ok := s.programmed[k]; ok {
				if Equal(cur, want) {
					continue
				}
				needF -= len(cur.Frontends)
				needB -= len(cur.Backends)
			}
			needF += len(want.Frontends)
			needB += len(want.Backends)
			todo = append(todo, want)
			todoKeys = append(todoKeys, k)
		}
		if len(todo) == 0 {
			s.clearFull(name)
			continue
		}
		if needF > freeF || needB > freeB {
			s.markFull(name, fmt.Sprintf("needs %d more frontends and %d more backends, %d and %d free", max(needF, 0), max(needB, 0), freeF, freeB))
			continue
		}
		full := false
		for i, want := range todo {
			err := s.opts.Datapath.Apply(want)
			if errors.Is(err, socklb.ErrFull) {
				// Our accounting and the datapath's disagree (e.g. the
				// maps hold more than we know of); trust the datapath.
				s.markFull(name, err.Error())
				full = true
				break
			}
			if err != nil {
				return res, fmt.Errorf("apply %s (id %d): %w", todoKeys[i], want.ID, err)
			}
			if cur, ok := s.programmed[todoKeys[i]]; ok {
				freeF += len(cur.Frontends)
				freeB += len(cur.Backends)
			}
			freeF -= len(want.Frontends)
			freeB -= len(want.Backends)
			s.setProgrammed(todoKeys[i], want)
			res.Applied++
		}
		if !full {
			s.clearFull(name)
		}
	}
	return res, nil
}

// markFull records that a Service did not fit: a Warning Event on it (once
// per episode, not per sync) and an error in NodeState.
func (s *Syncer) markFull(name types.NamespacedName, detail string) {
	msg := fmt.Sprintf("Service %s not programmed on node %s: socket LB map full (%s); what was programmed before stays",
		name, s.opts.NodeName, detail)
	s.mu.Lock()
	_, already := s.fullErrs[name]
	s.fullErrs[name] = msg
	s.mu.Unlock()
	if already {
		return
	}
	s.opts.Metrics.SyncErrors.WithLabelValues("full").Inc()
	s.log.Warn("service does not fit the socket LB maps", "service", name.String(), "detail", detail)
	if svc := s.services[name]; svc != nil && s.opts.Recorder != nil {
		s.opts.Recorder.Eventf(svc, v1.EventTypeWarning, ReasonMapFull, "%s", msg)
	}
}

func (s *Syncer) clearFull(name types.NamespacedName) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.fullErrs, name)
}
