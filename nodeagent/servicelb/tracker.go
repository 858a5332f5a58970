package servicelb

import (
	"sync"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
)

// Tracker records what changed since the last sync, in kube-proxy's style
// (apisync.ChangeSet): an object that went back to its previous state is
// dropped, so a no-op update or an add+delete between two syncs costs
// nothing.
//
// Event handlers call the Record methods from informer goroutines; the sync
// takes the accumulated changes with Take, all sets at one instant.
type Tracker struct {
	mu       sync.Mutex
	services *apisync.ChangeSet[types.NamespacedName, v1.Service]
	slices   *apisync.ChangeSet[types.NamespacedName, discovery.EndpointSlice] // keyed by slice namespace/name
	node     *apisync.ChangeSet[string, NodeInfo]
}

// Changes are the changes taken from a Tracker.
type Changes struct {
	// Services maps a Service to its latest state (nil: deleted).
	Services map[types.NamespacedName]*v1.Service
	// Slices maps an EndpointSlice (by its own name) to its latest state
	// (nil: deleted) and Previous to the state at the last sync, so the
	// sync can tell which Services lost a slice.
	Slices         map[types.NamespacedName]*discovery.EndpointSlice
	PreviousSlices map[types.NamespacedName]*discovery.EndpointSlice
	// Nodes is set when a node appeared, went or changed its InternalIPs.
	Nodes bool
}

// Empty reports whether there is nothing to sync.
func (c Changes) Empty() bool {
	return len(c.Services) == 0 && len(c.Slices) == 0 && !c.Nodes
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	return &Tracker{
		services: apisync.NewChangeSet[types.NamespacedName](serviceEqual),
		slices:   apisync.NewChangeSet[types.NamespacedName](sliceEqual),
		node:     apisync.NewChangeSet[string](nodeInfoEqual),
	}
}

// serviceEqual compares what translation reads; metadata such as
// resourceVersion or managedFields churns without changing the datapath.
func serviceEqual(a, b *v1.Service) bool {
	return apiequality.Semantic.DeepEqual(a.Spec, b.Spec) &&
		apiequality.Semantic.DeepEqual(a.Status.LoadBalancer, b.Status.LoadBalancer)
}

func sliceEqual(a, b *discovery.EndpointSlice) bool {
	return a.AddressType == b.AddressType &&
		a.Labels[discovery.LabelServiceName] == b.Labels[discovery.LabelServiceName] &&
		apiequality.Semantic.DeepEqual(a.Endpoints, b.Endpoints) &&
		apiequality.Semantic.DeepEqual(a.Ports, b.Ports)
}

// RecordService records one Service event: (nil, svc) add, (old, new)
// update, (svc, nil) delete. It reports whether a change is pending for
// that Service afterwards.
func (t *Tracker) RecordService(previous, current *v1.Service) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.services.Record(apisync.Key(previous, current), previous, current)
}

// RecordSlice records one EndpointSlice event, like RecordService.
func (t *Tracker) RecordSlice(previous, current *discovery.EndpointSlice) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.slices.Record(apisync.Key(previous, current), previous, current)
}

// RecordNode records a change of a Node's addresses (current nil when it
// was deleted): the agent's own give its NodePort frontends, the others'
// too (NodeInfo.OtherNodeIPs).
func (t *Tracker) RecordNode(previous, current *v1.Node) bool {
	prev, cur := NodeInfoFromNode(previous), NodeInfoFromNode(current)
	name := cur.Name
	if name == "" {
		name = prev.Name
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.node.Record(name, &prev, &cur)
}

func nodeInfoEqual(a, b *NodeInfo) bool {
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
	return t.services.Len() + t.slices.Len() + t.node.Len()
}

// Take returns the accumulated changes and empties the tracker.
func (t *Tracker) Take() Changes {
	t.mu.Lock()
	services, slices, node := t.services.Take(), t.slices.Take(), t.node.Take()
	t.mu.Unlock()
	c := Changes{
		Services:       make(map[types.NamespacedName]*v1.Service, len(services)),
		Slices:         make(map[types.NamespacedName]*discovery.EndpointSlice, len(slices)),
		PreviousSlices: make(map[types.NamespacedName]*discovery.EndpointSlice, len(slices)),
	}
	for k, ch := range services {
		c.Services[k] = ch.Cur
	}
	for k, ch := range slices {
		c.Slices[k] = ch.Cur
		c.PreviousSlices[k] = ch.Prev
	}
	c.Nodes = len(node) > 0
	return c
}
