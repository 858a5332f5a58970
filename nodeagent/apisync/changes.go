package apisync

import (
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

// Change is one object's state at the last sync (Prev) and now (Cur); nil
// means absent.
type Change[T any] struct{ Prev, Cur *T }

// ChangeSet records changes the way kube-proxy's change trackers do: for
// each key the first previous and the latest current state, and a key whose
// relevant fields end up where they started drops out, so a burst of status
// updates, or an add and a delete between two syncs, costs no sync.
//
// A ChangeSet is not safe for concurrent use: a tracker holding several
// sets guards them with one mutex, so a sync takes all of them at one
// instant.
type ChangeSet[K comparable, T any] struct {
	same func(a, b *T) bool
	m    map[K]Change[T]
}

// NewChangeSet returns an empty set; same reports whether two non-nil
// states are equal in every field the sync reads.
func NewChangeSet[K comparable, T any](same func(a, b *T) bool) *ChangeSet[K, T] {
	return &ChangeSet[K, T]{same: same, m: map[K]Change[T]{}}
}

// Record notes an add (prev nil), update, or delete (cur nil) of key and
// reports whether a change is pending for key afterwards.
func (s *ChangeSet[K, T]) Record(key K, prev, cur *T) bool {
	ch, pending := s.m[key]
	if !pending {
		ch.Prev = prev
	}
	ch.Cur = cur
	if (ch.Prev == nil && ch.Cur == nil) || (ch.Prev != nil && ch.Cur != nil && s.same(ch.Prev, ch.Cur)) {
		delete(s.m, key)
		return false
	}
	s.m[key] = ch
	return true
}

// Len is the number of keys with a pending change.
func (s *ChangeSet[K, T]) Len() int { return len(s.m) }

// Take returns the pending changes and empties the set.
func (s *ChangeSet[K, T]) Take() map[K]Change[T] {
	m := s.m
	s.m = make(map[K]Change[T], len(m))
	return m
}

// Object is what Key needs of an API object.
type Object interface {
	GetNamespace() string
	GetName() string
}

// Key is the namespace/name of whichever of prev and cur is set (cur
// first); the zero name when both are nil.
func Key[T any, PT interface {
	*T
	Object
}](prev, cur PT) types.NamespacedName {
	o := cur
	if o == nil {
		o = prev
	}
	if o == nil {
		return types.NamespacedName{}
	}
	return types.NamespacedName{Namespace: o.GetNamespace(), Name: o.GetName()}
}

// Watch adds Handler(record, request) to inf.
func Watch[T any](inf cache.SharedIndexInformer, record func(prev, cur *T) bool, request func()) error {
	_, err := inf.AddEventHandler(Handler(record, request))
	return err
}

// Handler turns informer callbacks into record calls and asks request for
// a run when record says a change is pending. It never computes anything:
// the runner does, once per burst. Tombstones (DeletedFinalStateUnknown)
// are unwrapped; objects of another type are ignored.
func Handler[T any](record func(prev, cur *T) bool, request func()) cache.ResourceEventHandler {
	as := func(o any) *T {
		if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
			o = d.Obj
		}
		t, _ := o.(*T)
		return t
	}
	req := func(pending bool) {
		if pending {
			request()
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) {
			if t := as(o); t != nil {
				req(record(nil, t))
			}
		},
		UpdateFunc: func(o, n any) {
			if t := as(n); t != nil {
				req(record(as(o), t))
			}
		},
		DeleteFunc: func(o any) {
			if t := as(o); t != nil {
				req(record(t, nil))
			}
		},
	}
}
