package l7

import (
	"cmp"
	"fmt"
	"slices"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// policyStatus is the status p should have after this node's agent wrote
// its view: invalid is the validation message ("" when valid); entry is this
// node's status.nodes entry, nil when no pod of this node is selected (the
// entry is then removed). Conditions are recomputed from all nodes' entries,
// so whichever agent writes last leaves a consistent object. It returns the
// new status and whether it differs from p's (no write otherwise).
func policyStatus(p *v1alpha1.L7Policy, node string, invalid string, entry *v1alpha1.L7PolicyNodeStatus, now metav1.Time) (v1alpha1.L7PolicyStatus, bool) {
	st := *p.Status.DeepCopy()
	st.ObservedGeneration = p.Generation

	i := slices.IndexFunc(st.Nodes, func(n v1alpha1.L7PolicyNodeStatus) bool { return n.Node == node })
	switch {
	case entry == nil && i >= 0:
		st.Nodes = slices.Delete(st.Nodes, i, i+1)
	case entry != nil && i >= 0:
		e := *entry
		e.LastTransitionTime = st.Nodes[i].LastTransitionTime
		if e.Programmed != st.Nodes[i].Programmed || e.LastTransitionTime.IsZero() {
			e.LastTransitionTime = now
		}
		st.Nodes[i] = e
	case entry != nil:
		e := *entry
		e.LastTransitionTime = now
		st.Nodes = append(st.Nodes, e)
	}
	slices.SortFunc(st.Nodes, func(a, b v1alpha1.L7PolicyNodeStatus) int { return cmp.Compare(a.Node, b.Node) })

	accepted := metav1.Condition{Type: v1alpha1.L7ConditionAccepted, Status: metav1.ConditionTrue,
		Reason: v1alpha1.L7ReasonValid, Message: "the spec is valid", ObservedGeneration: p.Generation}
	if invalid != "" {
		accepted.Status, accepted.Reason, accepted.Message = metav1.ConditionFalse, v1alpha1.L7ReasonInvalid, truncate(invalid)
	}
	setCondition(&st.Conditions, accepted, now)
	setCondition(&st.Conditions, programmed(p.Generation, invalid != "", st.Nodes), now)
	return st, !equality.Semantic.DeepEqual(st, p.Status)
}

// programmed aggregates the nodes' entries: True when every node ACKed this
// generation, False when one rejected it (its message shown) or when the
// policy is invalid or selects nothing, Unknown while versions travel.
func programmed(gen int64, invalid bool, nodes []v1alpha1.L7PolicyNodeStatus) metav1.Condition {
	c := metav1.Condition{Type: v1alpha1.L7ConditionProgrammed, ObservedGeneration: gen}
	switch {
	case invalid:
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, v1alpha1.L7ReasonInvalid, "not sent to any Envoy: the spec is invalid (see Accepted)"
		return c
	case len(nodes) == 0:
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, v1alpha1.L7ReasonNoDestinations, "no running pod is selected on any node"
		return c
	}
	var pending []string
	for _, n := range nodes {
		switch {
		case n.Programmed == metav1.ConditionFalse:
			c.Status, c.Reason = metav1.ConditionFalse, v1alpha1.L7ReasonNacked
			c.Message = truncate(fmt.Sprintf("Envoy on node %s rejected version %s: %s", n.Node, n.NackedVersion, n.Message))
			return c
		case n.Programmed != metav1.ConditionTrue || n.ObservedGeneration != gen:
			pending = append(pending, n.Node)
		}
	}
	if len(pending) > 0 {
		c.Status, c.Reason = metav1.ConditionUnknown, v1alpha1.L7ReasonPending
		c.Message = truncate(fmt.Sprintf("waiting for the Envoy of %d node(s) to ACK: %v", len(pending), pending))
		return c
	}
	c.Status, c.Reason = metav1.ConditionTrue, v1alpha1.L7ReasonAcked
	c.Message = fmt.Sprintf("the Envoy of every node with a selected pod (%d) ACKed this generation", len(nodes))
	return c
}

// setCondition is meta.SetStatusCondition, but keeps the transition time
// when only the message or generation changed, and uses now (tests).
func setCondition(conds *[]metav1.Condition, c metav1.Condition, now metav1.Time) {
	c.LastTransitionTime = now
	if old := meta.FindStatusCondition(*conds, c.Type); old != nil && old.Status == c.Status {
		c.LastTransitionTime = old.LastTransitionTime
	}
	meta.SetStatusCondition(conds, c)
}

// truncate keeps a message within the CRD's 32 KiB condition message limit
// (and Envoy's NACK texts can be long).
func truncate(s string) string {
	const limit = 4000
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "…"
}
