package apisync

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

func pod(name, label string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{"app": label}}}
}

func samePodLabels(a, b *corev1.Pod) bool { return a.Labels["app"] == b.Labels["app"] }

func TestChangeSet(t *testing.T) {
	a, a2, b, c := pod("p", "a"), pod("p", "a"), pod("p", "b"), pod("p", "c")
	a2.ResourceVersion = "2" // a field the sync does not read
	tests := []struct {
		name     string
		events   [][2]*corev1.Pod // prev, cur
		pending  bool
		wantPrev *corev1.Pod
		wantCur  *corev1.Pod
	}{
		{name: "add", events: [][2]*corev1.Pod{{nil, a}}, pending: true, wantCur: a},
		{name: "update", events: [][2]*corev1.Pod{{a, b}}, pending: true, wantPrev: a, wantCur: b},
		{name: "delete", events: [][2]*corev1.Pod{{a, nil}}, pending: true, wantPrev: a},
		{name: "update of an unread field is dropped", events: [][2]*corev1.Pod{{a, a2}}},
		{name: "update and back is dropped", events: [][2]*corev1.Pod{{a, b}, {b, a2}}},
		{name: "add then delete is dropped", events: [][2]*corev1.Pod{{nil, a}, {a, nil}}},
		{name: "first prev and last cur are kept", events: [][2]*corev1.Pod{{a, b}, {b, c}}, pending: true, wantPrev: a, wantCur: c},
		{name: "delete then re-add differently", events: [][2]*corev1.Pod{{a, nil}, {nil, b}}, pending: true, wantPrev: a, wantCur: b},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewChangeSet[types.NamespacedName](samePodLabels)
			var pending bool
			for _, e := range tt.events {
				pending = s.Record(Key(e[0], e[1]), e[0], e[1])
			}
			if pending != tt.pending || (s.Len() == 1) != tt.pending {
				t.Fatalf("pending = %v, Len = %d; want pending %v", pending, s.Len(), tt.pending)
			}
			got := s.Take()
			ch, ok := got[types.NamespacedName{Namespace: "ns", Name: "p"}]
			if ok != tt.pending {
				t.Fatalf("Take = %v, want a change: %v", got, tt.pending)
			}
			if ok && (ch.Prev != tt.wantPrev || ch.Cur != tt.wantCur) {
				t.Errorf("change = %p/%p, want %p/%p", ch.Prev, ch.Cur, tt.wantPrev, tt.wantCur)
			}
			if s.Len() != 0 || len(s.Take()) != 0 {
				t.Error("Take did not empty the set")
			}
		})
	}
}

func TestKey(t *testing.T) {
	var none *corev1.Pod
	if k := Key(none, none); k != (types.NamespacedName{}) {
		t.Errorf("Key(nil, nil) = %v", k)
	}
	if k := Key(pod("old", "a"), nil); k.Name != "old" {
		t.Errorf("Key(prev, nil) = %v", k)
	}
	if k := Key(pod("old", "a"), pod("new", "a")); k.Name != "new" {
		t.Errorf("Key(prev, cur) = %v, want cur's name", k)
	}
}

// TestHandler drives the adapter as an informer would, tombstones and
// foreign types included, and checks that only pending changes request a run.
func TestHandler(t *testing.T) {
	s := NewChangeSet[types.NamespacedName](samePodLabels)
	requests := 0
	h := Handler(func(prev, cur *corev1.Pod) bool { return s.Record(Key(prev, cur), prev, cur) }, func() { requests++ })
	a, a2, b := pod("p", "a"), pod("p", "a"), pod("p", "b")
	steps := []struct {
		name     string
		do       func()
		requests int
		pending  int
	}{
		{"add requests a run", func() { h.OnAdd(a, false) }, 1, 1},
		{"update back to nothing pending requests none", func() { h.OnDelete(a) }, 1, 0},
		{"re-add", func() { h.OnAdd(a, false) }, 2, 1},
		{"no-op update while pending keeps the change", func() { h.OnUpdate(a, a2) }, 3, 1},
		{"tombstone delete is unwrapped", func() { h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/p", Obj: a2}) }, 3, 0},
		{"foreign type is ignored", func() { h.OnAdd(&corev1.Service{}, false) }, 3, 0},
		{"update", func() { h.OnAdd(a, false); s.Take(); h.OnUpdate(a, b) }, 5, 1},
	}
	for _, st := range steps {
		st.do()
		if requests != st.requests || s.Len() != st.pending {
			t.Fatalf("%s: requests = %d, pending = %d; want %d, %d", st.name, requests, s.Len(), st.requests, st.pending)
		}
	}
}

func TestIntervalsOr(t *testing.T) {
	def := Intervals{Min: 1, Max: 2, Retry: 3}
	if got := (Intervals{}).Or(def); got != def {
		t.Errorf("zero.Or = %v, want %v", got, def)
	}
	if got := (Intervals{Min: 7, Retry: -1}).Or(def); got != (Intervals{Min: 7, Max: 2, Retry: 3}) {
		t.Errorf("partial.Or = %v", got)
	}
}
