package v1alpha1_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/fake"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// TestClientsetRoundTrip writes a NodeState and reads it back the way the
// plugin does (List) through the generated clientset. (Its fake tracker
// cannot create by apply; nodeagent/agent tests the agent's apply.)
func TestClientsetRoundTrip(t *testing.T) {
	in := &apiv1.NodeState{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubectl-ebpf.io/v1alpha1", Kind: "NodeState"},
		ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"},
		Status: apiv1.NodeStateStatus{
			AgentVersion: "dev", Kernel: "6.18.0", Ready: true,
			Features:  []apiv1.KernelFeature{{Name: "btf", Available: true}, {Name: "link-tcx", Detail: "not supported"}},
			Active:    []string{"sockstats"},
			Heartbeat: metav1.NewTime(time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)),
		},
	}
	if got := apiv1.NodeStateGVK.GroupVersion().String() + "/" + apiv1.NodeStateKind; got != in.APIVersion+"/"+in.Kind {
		t.Errorf("GVK = %s", got)
	}
	c := fake.NewSimpleClientset().EbpfV1alpha1().NodeStates()
	ctx := context.Background()
	if _, err := c.Create(ctx, in, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	list, err := c.List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 1 {
		t.Fatalf("listed %d NodeStates, want 1", len(list.Items))
	}
	out := &list.Items[0]
	// metav1.Time decodes in the local zone: compare the instant, then the rest.
	if !out.Status.Heartbeat.Equal(&in.Status.Heartbeat) {
		t.Errorf("heartbeat = %v, want %v", out.Status.Heartbeat, in.Status.Heartbeat)
	}
	out.Status.Heartbeat = in.Status.Heartbeat
	out.ResourceVersion = ""
	if !reflect.DeepEqual(in.Status, out.Status) || out.Name != in.Name {
		t.Errorf("round trip:\n got %+v\nwant %+v", out, in)
	}
}
