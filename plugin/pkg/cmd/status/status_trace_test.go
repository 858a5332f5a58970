package status_test

import (
	"encoding/json"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

// Lost trace events are a line per node after the table, never silent; a
// node that lost none adds nothing. Losses do not make the node unhealthy.
func TestStatusTraceLost(t *testing.T) {
	for _, tt := range []struct {
		name  string
		trace *apiv1.TraceNodeStatus
		want  string
	}{
		{name: "nothing lost", trace: &apiv1.TraceNodeStatus{Published: map[string]int64{"policy": 12}},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE      ERRORS\nkebpf-node   true    dev       6.18.0   sockstats   -\n"},
		{name: "lost", trace: &apiv1.TraceNodeStatus{Published: map[string]int64{"policy": 12},
			Lost: map[string]int64{apiv1.TraceLostSlowClient: 3, apiv1.TraceLostKernel: 120}},
			want: "NODE         READY   VERSION   KERNEL   ACTIVE      ERRORS\nkebpf-node   true    dev       6.18.0   sockstats   -\n" +
				"trace: node kebpf-node lost 123 events since its agent started (kernel-buffer-full 120, slow-client 3)\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st := testutil.NodeState("kebpf-node", apiv1.NodeStateStatus{
				AgentVersion: "dev", Kernel: "6.18.0", Ready: true, Heartbeat: metav1.NewTime(now), Active: []string{"sockstats"}, Trace: tt.trace,
			})
			f := testutil.NewFake(t, oneNode("features:\n  sockstats: true\n", 0), testutil.CRD(), st)
			out, err := run(t, f, "")
			if err != nil {
				t.Errorf("err = %v", err)
			}
			if out != tt.want {
				t.Errorf("output:\n%q\nwant:\n%q", out, tt.want)
			}
			out, _ = run(t, f, "json")
			var r struct {
				Nodes []struct {
					Trace *apiv1.TraceNodeStatus `json:"trace"`
				} `json:"nodes"`
			}
			if err := json.Unmarshal([]byte(out), &r); err != nil || len(r.Nodes) != 1 || r.Nodes[0].Trace == nil ||
				r.Nodes[0].Trace.Published["policy"] != 12 {
				t.Errorf("json: %v %s", err, out)
			}
		})
	}
}
