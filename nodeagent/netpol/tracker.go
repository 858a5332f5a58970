package netpol

import (
	"maps"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
)

// Changes is what accumulated since the last sync.
type Changes struct {
	Policies   map[types.NamespacedName]apisync.Change[networkingv1.NetworkPolicy]
	Pods       map[types.NamespacedName]apisync.Change[corev1.Pod]
	Namespaces map[string]apisync.Change[corev1.Namespace]
	// Retry lists local pods whose interface was not found yet.
	Retry map[types.NamespacedName]bool
	// Interfaces: links came or went; every local pod's interface is
	// looked up again.
	Interfaces bool
}

func (c *Changes) empty() bool {
	return len(c.Policies) == 0 && len(c.Pods) == 0 && len(c.Namespaces) == 0 && len(c.Retry) == 0 && !c.Interfaces
}

// Tracker records changes the way kube-proxy's change trackers do
// (apisync.ChangeSet): an object whose relevant fields end up where they
// started drops out, so a burst of status updates costs no sync.
type Tracker struct {
	mu         sync.Mutex
	policies   *apisync.ChangeSet[types.NamespacedName, networkingv1.NetworkPolicy]
	pods       *apisync.ChangeSet[types.NamespacedName, corev1.Pod]
	namespaces *apisync.ChangeSet[string, corev1.Namespace]
	retry      map[types.NamespacedName]bool
	interfaces bool
}

func NewTracker() *Tracker {
	return &Tracker{
		policies: apisync.NewChangeSet[types.NamespacedName](func(a, b *networkingv1.NetworkPolicy) bool {
			return apiequality.Semantic.DeepEqual(a.Spec, b.Spec)
		}),
		pods: apisync.NewChangeSet[types.NamespacedName](samePod),
		namespaces: apisync.NewChangeSet[string](func(a, b *corev1.Namespace) bool {
			return maps.Equal(a.Labels, b.Labels)
		}),
		retry: map[types.NamespacedName]bool{},
	}
}

// Take returns the accumulated changes and starts afresh.
func (t *Tracker) Take() Changes {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := Changes{Policies: t.policies.Take(), Pods: t.pods.Take(), Namespaces: t.namespaces.Take(),
		Retry: t.retry, Interfaces: t.interfaces}
	t.retry, t.interfaces = map[types.NamespacedName]bool{}, false
	return c
}

// RecordPolicy notes a policy add (prev nil), update or delete (cur nil) and
// reports whether a sync is needed.
func (t *Tracker) RecordPolicy(prev, cur *networkingv1.NetworkPolicy) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.policies.Record(apisync.Key(prev, cur), prev, cur)
}

// RecordPod notes a pod change; only fields the compiler reads count.
func (t *Tracker) RecordPod(prev, cur *corev1.Pod) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pods.Record(apisync.Key(prev, cur), prev, cur)
}

// RecordNamespace notes a namespace change; only labels count.
func (t *Tracker) RecordNamespace(prev, cur *corev1.Namespace) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.namespaces.Record(apisync.Key(prev, cur).Name, prev, cur)
}

// RecordRetry asks for the interfaces of these pods to be looked up again.
func (t *Tracker) RecordRetry(keys []types.NamespacedName) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		t.retry[k] = true
	}
}

// RecordInterfaces notes that host links changed.
func (t *Tracker) RecordInterfaces() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.interfaces = true
}

func samePod(a, b *corev1.Pod) bool {
	if a.UID != b.UID || a.Spec.NodeName != b.Spec.NodeName || a.Spec.HostNetwork != b.Spec.HostNetwork ||
		isPeerPod(a) != isPeerPod(b) || !maps.Equal(a.Labels, b.Labels) || !slices.Equal(PodIPs(a), PodIPs(b)) {
		return false
	}
	if len(a.Spec.Containers) != len(b.Spec.Containers) {
		return false
	}
	for i := range a.Spec.Containers {
		if !apiequality.Semantic.DeepEqual(a.Spec.Containers[i].Ports, b.Spec.Containers[i].Ports) {
			return false
		}
	}
	return true
}
