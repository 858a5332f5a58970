package netpol

import (
	"maps"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
)

// change is one object's previous (as last synced) and current state; nil
// means absent.
type change[T any] struct{ prev, cur *T }

// Changes is what accumulated since the last sync.
type Changes struct {
	Policies   map[types.NamespacedName]change[networkingv1.NetworkPolicy]
	Pods       map[types.NamespacedName]change[corev1.Pod]
	Namespaces map[string]change[corev1.Namespace]
	// Retry lists local pods whose interface was not found yet.
	Retry map[types.NamespacedName]bool
	// Interfaces: links came or went; every local pod's interface is
	// looked up again.
	Interfaces bool
}

func (c *Changes) empty() bool {
	return len(c.Policies) == 0 && len(c.Pods) == 0 && len(c.Namespaces) == 0 && len(c.Retry) == 0 && !c.Interfaces
}

// Tracker records changes the way kube-proxy's change trackers do: event
// handlers only note the first previous and the latest current state of an
// object, and an object whose relevant fields end up where they started
// drops out, so a burst of status updates costs no sync.
type Tracker struct {
	mu sync.Mutex
	c  Changes
}

func NewTracker() *Tracker {
	t := &Tracker{}
	t.reset()
	return t
}

func (t *Tracker) reset() {
	t.c = Changes{
		Policies:   map[types.NamespacedName]change[networkingv1.NetworkPolicy]{},
		Pods:       map[types.NamespacedName]change[corev1.Pod]{},
		Namespaces: map[string]change[corev1.Namespace]{},
		Retry:      map[types.NamespacedName]bool{},
	}
}

// Take returns the accumulated changes and starts afresh.
func (t *Tracker) Take() Changes {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.c
	t.reset()
	return c
}

func recordChange[K comparable, T any](m map[K]change[T], key K, prev, cur *T, same func(a, b *T) bool) bool {
	ch, pending := m[key]
	if !pending {
		ch.prev = prev
	}
	ch.cur = cur
	if (ch.prev == nil && ch.cur == nil) || (ch.prev != nil && ch.cur != nil && same(ch.prev, ch.cur)) {
		delete(m, key)
		return false
	}
	m[key] = ch
	return true
}

// RecordPolicy notes a policy add (prev nil), update or delete (cur nil) and
// reports whether a sync is needed.
func (t *Tracker) RecordPolicy(prev, cur *networkingv1.NetworkPolicy) bool {
	key := nsName(prev, cur, func(p *networkingv1.NetworkPolicy) (string, string) { return p.Namespace, p.Name })
	t.mu.Lock()
	defer t.mu.Unlock()
	return recordChange(t.c.Policies, key, prev, cur, func(a, b *networkingv1.NetworkPolicy) bool {
		return apiequality.Semantic.DeepEqual(a.Spec, b.Spec)
	})
}

// RecordPod notes a pod change; only fields the compiler reads count.
func (t *Tracker) RecordPod(prev, cur *corev1.Pod) bool {
	key := nsName(prev, cur, func(p *corev1.Pod) (string, string) { return p.Namespace, p.Name })
	t.mu.Lock()
	defer t.mu.Unlock()
	return recordChange(t.c.Pods, key, prev, cur, samePod)
}

// RecordNamespace notes a namespace change; only labels count.
func (t *Tracker) RecordNamespace(prev, cur *corev1.Namespace) bool {
	name := ""
	if prev != nil {
		name = prev.Name
	} else if cur != nil {
		name = cur.Name
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return recordChange(t.c.Namespaces, name, prev, cur, func(a, b *corev1.Namespace) bool { return maps.Equal(a.Labels, b.Labels) })
}

// RecordRetry asks for the interfaces of these pods to be looked up again.
func (t *Tracker) RecordRetry(keys []types.NamespacedName) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		t.c.Retry[k] = true
	}
}

// RecordInterfaces notes that host links changed.
func (t *Tracker) RecordInterfaces() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.c.Interfaces = true
}

func nsName[T any](prev, cur *T, f func(*T) (string, string)) types.NamespacedName {
	o := cur
	if o == nil {
		o = prev
	}
	ns, n := f(o)
	return types.NamespacedName{Namespace: ns, Name: n}
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
