package l7

import (
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

func nodeEntry(node string, prog metav1.ConditionStatus, gen int64) *v1alpha1.L7PolicyNodeStatus {
	return &v1alpha1.L7PolicyNodeStatus{Node: node, Programmed: prog, ObservedGeneration: gen, AckedVersion: "v1"}
}

func TestPolicyStatus(t *testing.T) {
	t0 := metav1.NewTime(time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC))
	t1 := metav1.NewTime(t0.Add(time.Minute))
	pol := func(gen int64, nodes ...v1alpha1.L7PolicyNodeStatus) *v1alpha1.L7Policy {
		p := &v1alpha1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api", Generation: gen}}
		p.Status.Nodes = nodes
		return p
	}
	for _, tc := range []struct {
		name        string
		p           *v1alpha1.L7Policy
		invalid     string
		entry       *v1alpha1.L7PolicyNodeStatus
		wantNodes   []string
		accepted    metav1.ConditionStatus
		programmed  metav1.ConditionStatus
		reason      string
		msgContains string
	}{
		{name: "first ack", p: pol(1), entry: nodeEntry("a", metav1.ConditionTrue, 1),
			wantNodes: []string{"a"}, accepted: metav1.ConditionTrue, programmed: metav1.ConditionTrue, reason: v1alpha1.L7ReasonAcked},
		{name: "other node pending", p: pol(2, *nodeEntry("b", metav1.ConditionUnknown, 2)), entry: nodeEntry("a", metav1.ConditionTrue, 2),
			wantNodes: []string{"a", "b"}, accepted: metav1.ConditionTrue, programmed: metav1.ConditionUnknown, reason: v1alpha1.L7ReasonPending, msgContains: "[b]"},
		{name: "other node acked an older generation", p: pol(3, *nodeEntry("b", metav1.ConditionTrue, 2)), entry: nodeEntry("a", metav1.ConditionTrue, 3),
			wantNodes: []string{"a", "b"}, accepted: metav1.ConditionTrue, programmed: metav1.ConditionUnknown, reason: v1alpha1.L7ReasonPending},
		{name: "nack wins", p: pol(1, *nodeEntry("b", metav1.ConditionTrue, 1)),
			entry:     &v1alpha1.L7PolicyNodeStatus{Node: "a", Programmed: metav1.ConditionFalse, ObservedGeneration: 1, NackedVersion: "v9", Message: "regex too big"},
			wantNodes: []string{"a", "b"}, accepted: metav1.ConditionTrue, programmed: metav1.ConditionFalse, reason: v1alpha1.L7ReasonNacked, msgContains: "regex too big"},
		{name: "no local pod: entry removed, nothing left", p: pol(1, *nodeEntry("a", metav1.ConditionTrue, 1)),
			accepted: metav1.ConditionTrue, programmed: metav1.ConditionFalse, reason: v1alpha1.L7ReasonNoDestinations},
		{name: "invalid", p: pol(1), invalid: "spec.rules[0].path.regex: Invalid value",
			accepted: metav1.ConditionFalse, programmed: metav1.ConditionFalse, reason: v1alpha1.L7ReasonInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, changed := policyStatus(tc.p, "a", tc.invalid, tc.entry, t0)
			if !changed {
				t.Fatal("status unchanged, want a write")
			}
			var nodes []string
			for _, n := range st.Nodes {
				nodes = append(nodes, n.Node)
			}
			if strings.Join(nodes, ",") != strings.Join(tc.wantNodes, ",") {
				t.Errorf("nodes %v, want %v", nodes, tc.wantNodes)
			}
			acc := meta.FindStatusCondition(st.Conditions, v1alpha1.L7ConditionAccepted)
			prog := meta.FindStatusCondition(st.Conditions, v1alpha1.L7ConditionProgrammed)
			if acc == nil || prog == nil {
				t.Fatalf("conditions %+v", st.Conditions)
			}
			if acc.Status != tc.accepted || prog.Status != tc.programmed || prog.Reason != tc.reason {
				t.Errorf("accepted %s, programmed %s/%s; want %s, %s/%s", acc.Status, prog.Status, prog.Reason, tc.accepted, tc.programmed, tc.reason)
			}
			if !strings.Contains(prog.Message, tc.msgContains) {
				t.Errorf("programmed message %q does not contain %q", prog.Message, tc.msgContains)
			}
			if st.ObservedGeneration != tc.p.Generation {
				t.Errorf("observedGeneration %d", st.ObservedGeneration)
			}

			// Applying the same view again writes nothing and keeps times.
			again := tc.p.DeepCopy()
			again.Status = st
			st2, changed := policyStatus(again, "a", tc.invalid, tc.entry, t1)
			if changed {
				t.Errorf("second identical apply changed the status: %+v", st2)
			}
		})
	}
}

func TestTruncate(t *testing.T) {
	long := strings.Repeat("x", 10000)
	if got := truncate(long); len(got) > 4096 || !strings.HasSuffix(got, "…") {
		t.Errorf("truncate: %d bytes", len(got))
	}
	if truncate("short") != "short" {
		t.Error("short message changed")
	}
}
