package netpol

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// The CNI plugin's path: a pod bound to the node, no IP in the API yet.
func TestSyncAdmit(t *testing.T) {
	a := mkPod(podSpec{ns: "x", name: "a", node: testNode, ips: []string{"10.0.0.10"}, labels: map[string]string{"app": "a"}})
	fresh := mkPod(podSpec{ns: "x", name: "new", node: testNode, labels: map[string]string{"app": "new"}})
	fresh.Status = corev1.PodStatus{Phase: corev1.PodPending}
	// new: default-deny egress; a: ingress only from app=new.
	denyEgress := mustPolicy(t, `
metadata: {name: deny-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: new}}
  policyTypes: [Egress]`)
	fromNew := mustPolicy(t, `
metadata: {name: from-new, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: new}}}]`)
	h := startSyncer(t, nil, mkNamespace("x", nil), a, fresh, denyEgress, fromNew)
	h.settle(1)
	newID := h.s.ids.Endpoint(fresh.UID)
	aID := h.s.ids.Endpoint(a.UID)
	if _, ok := h.dp.state[newID]; ok {
		t.Fatal("a pod without IPs must not be programmed before Admit")
	}

	ip := netip.MustParseAddr("10.0.0.30")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := h.s.Admit(ctx, "x", "new", fresh.UID, []netip.Addr{ip})
	if err != nil {
		t.Fatalf("admit: %v", err)
	}
	if res.Endpoint != newID || !res.Egress || res.Ingress {
		t.Fatalf("admit result %+v, want endpoint %d egress-only", res, newID)
	}
	// Programmed when Admit returned, not later.
	h.dp.mu.Lock()
	ep, ok := h.dp.state[newID]
	aEP := h.dp.state[aID]
	h.dp.mu.Unlock()
	if !ok || !slices.Equal(ep.IPs, []netip.Addr{ip}) || ep.IfIndex != 130 || !ep.EgressEnforced {
		t.Fatalf("new pod's endpoint at Admit return: %+v (present %v)", ep, ok)
	}
	// The local peer saw the hinted IP in the same sync.
	if !slices.ContainsFunc(aEP.Ingress, func(p dp.PeerEntry) bool { return p.Prefix == netip.PrefixFrom(ip, 32) }) {
		t.Fatalf("pod a's ingress peers %+v lack the admitted pod's %v", aEP.Ingress, ip)
	}

	// The kubelet then reports the same IP: nothing changes.
	h.settle(0)
	upd := fresh.DeepCopy()
	upd.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip.String(), PodIPs: []corev1.PodIP{{IP: ip.String()}}}
	if _, err := h.client.CoreV1().Pods("x").UpdateStatus(context.Background(), upd, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range h.settle(0) {
		if c.id == newID || c.id == aID {
			t.Errorf("status with the admitted IP re-programmed endpoint %d: %s", c.id, c.op)
		}
	}
	h.s.mu.Lock()
	hints := len(h.s.hints)
	h.s.mu.Unlock()
	if hints != 0 {
		t.Errorf("%d hints left after the API caught up", hints)
	}
}

func TestSyncAdmitErrors(t *testing.T) {
	fresh := mkPod(podSpec{ns: "x", name: "new", node: testNode})
	fresh.Status = corev1.PodStatus{Phase: corev1.PodPending}
	other := mkPod(podSpec{ns: "x", name: "elsewhere", node: "node-2"})
	other.Status = corev1.PodStatus{Phase: corev1.PodPending}
	h := startSyncer(t, nil, mkNamespace("x", nil), fresh, other)
	ip := []netip.Addr{netip.MustParseAddr("10.0.0.31")}

	t.Run("pod not in the API", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		_, err := h.s.Admit(ctx, "x", "ghost", "", ip)
		var ae *AdmitError
		if err == nil || !strings.Contains(err.Error(), "not in the API cache") || !errors.As(err, &ae) || ae.AdmitReason() != "pod-not-found" {
			t.Fatalf("err = %v (want reason pod-not-found for the trace)", err)
		}
	})
	t.Run("pod bound to another node", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if _, err := h.s.Admit(ctx, "x", "elsewhere", "", ip); err == nil {
			t.Fatal("admitted a pod of another node")
		}
	})
	t.Run("wrong UID (an older pod of that name)", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if _, err := h.s.Admit(ctx, "x", "new", "other-uid", ip); err == nil {
			t.Fatal("admitted against a pod with another UID")
		}
	})
	t.Run("map full", func(t *testing.T) {
		h.dp.mu.Lock()
		h.dp.failNext = fmt.Errorf("apply: %w", dp.ErrFull)
		h.dp.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := h.s.Admit(ctx, "x", "new", fresh.UID, ip)
		var ae *AdmitError
		if err == nil || !strings.Contains(err.Error(), "cannot be programmed") || !errors.As(err, &ae) || ae.AdmitReason() != "cannot-program" {
			t.Fatalf("err = %v (want reason cannot-program for the trace)", err)
		}
	})
	t.Run("release forgets the hint", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		res, err := h.s.Admit(ctx, "x", "new", fresh.UID, ip)
		if err != nil {
			t.Fatal(err)
		}
		h.settle(0)
		h.s.Release("x", "new", fresh.UID)
		calls := h.settle(1)
		if !slices.ContainsFunc(calls, func(c dpCall) bool { return c.op == "delete" && c.id == res.Endpoint }) {
			t.Fatalf("after release of a pod still without IPs in the API, want its endpoint deleted; calls %+v", calls)
		}
	})
}

// pinnedDatapath is a fakeDatapath that, like bpf/netpol, keeps endpoints
// across agent restarts.
type pinnedDatapath struct{ *fakeDatapath }

func (p pinnedDatapath) Endpoints() (map[uint32]dp.EndpointPolicy, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[uint32]dp.EndpointPolicy{}
	for id, ep := range p.state {
		out[id] = ep
	}
	return out, nil
}

// A restarted agent takes over the previous agent's endpoints instead of
// colliding with them (the ifindex of x/a is still programmed as 7).
func TestSyncRestartAdoptsPinnedEndpoints(t *testing.T) {
	a := mkPod(podSpec{ns: "x", name: "a", node: testNode, ips: []string{"10.0.0.10"}})
	b := mkPod(podSpec{ns: "x", name: "b", node: testNode, ips: []string{"10.0.0.11"}})
	fdp := &fakeDatapath{state: map[uint32]dp.EndpointPolicy{
		7: {ID: 7, IfIndex: 110, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.10")}},
		// A pod that went away while no agent ran.
		9: {ID: 9, IfIndex: 150, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.50")}},
	}}
	h := startSyncer(t, func(o *Options) { o.Datapath = pinnedDatapath{fdp} }, mkNamespace("x", nil), a, b)
	h.dp = fdp
	h.settle(0)
	if id := h.s.ids.Endpoint(a.UID); id != 7 {
		t.Errorf("x/a has endpoint %d, want the pinned 7", id)
	}
	if id := h.s.ids.Endpoint(b.UID); id <= 9 {
		t.Errorf("x/b got endpoint %d, a pinned ID of another pod may not be reused", id)
	}
	fdp.mu.Lock()
	defer fdp.mu.Unlock()
	if _, ok := fdp.state[9]; ok {
		t.Error("the stale endpoint 9 is still programmed")
	}
	if ep := fdp.state[7]; ep.IfIndex != 110 {
		t.Errorf("x/a's endpoint: %+v", ep)
	}
	if len(fdp.state) != 2 {
		t.Errorf("endpoints %v, want x/a and x/b only", fdp.state)
	}
}
