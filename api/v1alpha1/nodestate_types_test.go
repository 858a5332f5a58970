package v1alpha1

import (
	"reflect"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestUnstructuredRoundTrip(t *testing.T) {
	in := &NodeState{
		ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"},
		Status: NodeStateStatus{
			AgentVersion: "dev", Kernel: "6.18.0", Ready: true,
			Features:  []KernelFeature{{Name: "btf", Available: true}, {Name: "link-tcx", Detail: "not supported"}},
			Active:    []string{"sockstats"},
			Heartbeat: metav1.NewTime(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)),
		},
	}
	u, err := ToUnstructured(in)
	if err != nil {
		t.Fatal(err)
	}
	if u.GetAPIVersion() != "kubectl-ebpf.io/v1alpha1" || u.GetKind() != "NodeState" {
		t.Errorf("apiVersion/kind = %q/%q", u.GetAPIVersion(), u.GetKind())
	}
	out, err := FromUnstructured(u)
	if err != nil {
		t.Fatal(err)
	}
	in.APIVersion, in.Kind = "kubectl-ebpf.io/v1alpha1", "NodeState"
	// metav1.Time decodes in the local zone: compare the instant, then the rest.
	if !out.Status.Heartbeat.Equal(&in.Status.Heartbeat) {
		t.Errorf("heartbeat = %v, want %v", out.Status.Heartbeat, in.Status.Heartbeat)
	}
	out.Status.Heartbeat = in.Status.Heartbeat
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip:\n got %+v\nwant %+v", out, in)
	}
}
