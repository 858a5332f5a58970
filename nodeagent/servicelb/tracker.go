package servicelb

import (
	"sync"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
)

// Tracker records what changed since the last sync, in kube-proxy's style:
// for each object the state at the last sync (previous) and the latest one
// (current). An object that went back to its previous state is dropped, so a
// no-op update or an add+delete between two syncs costs nothing.
//
// Event handlers call the Record methods from informer goroutines; the sync
// takes the accumulated changes with Take.
type Tracker struct {
	mu       sync.Mutex
	services map[types.NamespacedName]*serviceChange
	slices   map[types.NamespacedName]*sliceChange // keyed by slice namespace/name
	node     *nodeChange
}

type serviceChange struct{ previous, current *v1.Service }
type sliceChange struct{ previous, current *discovery.EndpointSlice }
type nodeChange struct{ previous, current NodeInfo }

// Changes are the changes taken from a Tracker.
type Changes struct {
	// Services maps a Service to its latest state (nil: deleted).
	Services map[types.NamespacedName]*v1.Service
	// Slices maps an EndpointSlice (by its own name) to its latest state
	// (nil: deleted) and Previous to the state at the last sync, so the
	// sync can tell which Services lost a slice.
	Slices         map[types.NamespacedName]*discovery.EndpointSlice
	PreviousSlices map[types.NamespacedName]*discovery.EndpointSlice
	// Node is set when the node's name or InternalIPs changed.
	Node *NodeInfo
}

// Empty reports whether there is nothing to sync.
func (c Changes) Empty() bool {
	return len(c.Services) == 0 && len(c.Slices) == 0 && c.Node == nil
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	return &Tracker{
		services: map[types.NamespacedName]*serviceChange{},
		slices:   map[types.NamespacedName]*sliceChange{},
	}
}

// serviceEqual compares what translation reads; metadata such as
// resourceVersion or managedFields churns without changing the datapath.
func serviceEqual(a, b *v1.Service) bool {
	if a == nil || b == nil {
		return a == b
	}
	return apiequality.Semantic.DeepEqual(a.Spec, b.Spec) &&
		apiequality.Semantic.DeepEqual(a.Status.LoadBalancer, b.Status.LoadBalancer)
}

func sliceEqual(a, b *discovery.EndpointSlice) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.AddressType == b.AddressType &&
		a.Labels[discovery.LabelServiceName] == b.Labels[discovery.LabelServiceName] &&
		apiequality.Semantic.DeepEqual(a.Endpoints, b.Endpoints) &&
		apiequality.Semantic.DeepEqual(a.Ports, b.Ports)
}

// RecordService records one Service event: (nil, svc) add, (old, new)
// update, (svc, nil) delete. It reports whether a change is pending for
// that Service afterwards.
func (t *Tracker) RecordService(previous, current *v1.Service) bool {
	svc := current
	if svc == nil {
		svc = previous
	}
	if svc == nil {
		return false
	}
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.services[key]
	if !ok {
		c = &serviceChange{previous: previous}
		t.services[key] = c
	}
	c.current = current
	if serviceEqual(c.previous, c.current) {
		delete(t.services, key)
		return false
	}
	return true
}

// RecordSlice records one EndpointSlice event, like RecordService.
func (t *Tracker) RecordSlice(previous, current *discovery.EndpointSlice) bool {
	sl := current
	if sl == nil {
		sl = previous
	}
	if sl == nil {
		return false
	}
	key := types.NamespacedName{Namespace: sl.Namespace, Name: sl.Name}
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.slices[key]
	if !ok {
		c = &sliceChange{previous: previous}
		t.slices[key] = c
	}
	c.current = current
	if sliceEqual(c.previous, c.current) {
		delete(t.slices, key)
		return false
	}
	return true
}

// RecordNode records the agent's Node (nil when it was deleted).
func (t *Tracker) RecordNode(previous, current *v1.Node) bool {
	prev, cur := NodeInfoFromNode(previous), NodeInfoFromNode(current)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.node == nil {
		t.node = &nodeChange{previous: prev}
	}
	t.node.current = cur
	if nodeInfoEqual(t.node.previous, t.node.current) {
		t.node = nil
		return false
	}
	return true
}

func nodeInfoEqual(a, b NodeInfo) bool {
	if a.Name != b.Name || len(a.IPs) != len(b.IPs) {
		return false
	}
	for i := range a.IPs {
		if a.IPs[i] != b.IPs[i] {
			return false
		}
	}
	return true
}

// Pending reports how many objects have a change waiting.
func (t *Tracker) Pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(t.services) + len(t.slices)
	if t.node != nil {
		n++
	}
	return n
}

// Take returns the accumulated changes and empties the tracker.
func (t *Tracker) Take() Changes {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := Changes{
		Services:       make(map[types.NamespacedName]*v1.Service, len(t.services)),
		Slices:         make(map[types.NamespacedName]*discovery.EndpointSlice, len(t.slices)),
		PreviousSlices: make(map[types.NamespacedName]*discovery.EndpointSlice, len(t.slices)),
	}
	for k, sc := range t.services {
		c.Services[k] = sc.current
	}
	for k, sc := range t.slices {
		c.Slices[k] = sc.current
		c.PreviousSlices[k] = sc.previous
	}
	if t.node != nil {
		n := t.node.current
		c.Node = &n
	}
	t.services = map[types.NamespacedName]*serviceChange{}
	t.slices = map[types.NamespacedName]*sliceChange{}
	t.node = nil
	return c
}
