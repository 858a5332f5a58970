package health_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/health"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

var now = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func node(name string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KernelVersion: "6.18.0"}}}
}

func agentPod(nodeName string, status corev1.PodStatus) *corev1.Pod {
	return testutil.AgentPod("kebpf-agent-"+nodeName, nodeName, status)
}

var runningReady = testutil.RunningReady

func daemonSet(desired, ready, updated int32) *appsv1.DaemonSet {
	return testutil.DaemonSet("localhost/kubectl-ebpf/agent:v1", desired, ready, updated)
}

func TestCollect(t *testing.T) {
	fresh := metav1.NewTime(now.Add(-10 * time.Second))
	f := testutil.NewFake(t,
		[]runtime.Object{
			testutil.Namespace(), daemonSet(4, 2, 4),
			node("n1"), node("n2"), node("n3"), node("n4"),
			agentPod("n1", runningReady),
			agentPod("n2", runningReady),
			agentPod("n3", corev1.PodStatus{Phase: corev1.PodPending, InitContainerStatuses: []corev1.ContainerStatus{{Name: "mount", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImageNeverPull"}}}}}),
		},
		testutil.CRD(),
		testutil.NodeState("n1", apiv1.NodeStateStatus{AgentVersion: "v1", Kernel: "6.18.0-1", Ready: true, Heartbeat: fresh, Active: []string{"sockstats"},
			Features: []apiv1.KernelFeature{{Name: "cgroup_sock", Available: true}, {Name: "tcx", Available: false}}}),
		testutil.NodeState("n2", apiv1.NodeStateStatus{AgentVersion: "v1", Kernel: "6.18.0-1", Ready: true, Heartbeat: metav1.NewTime(now.Add(-5 * time.Minute))}),
		testutil.NodeState("n4", apiv1.NodeStateStatus{AgentVersion: "v1", Ready: false, Heartbeat: fresh, Errors: []string{"attach sockstats: permission denied"}}),
	)
	r, err := health.Collect(context.Background(), f.Clients, now)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Installed || r.Healthy() {
		t.Fatalf("installed=%v healthy=%v", r.Installed, r.Healthy())
	}
	want := []struct {
		name   string
		ready  bool
		errors string
		state  string
	}{
		{"n1", true, "", "ready"},
		{"n2", false, "heartbeat stale (5m0s ago)", "agent Running, not ready (heartbeat stale (5m0s ago))"},
		{"n3", false, "agent pod Pending (mount: ErrImageNeverPull); no NodeState reported", "agent Pending (mount: ErrImageNeverPull)"},
		{"n4", false, "no agent pod; attach sockstats: permission denied", "no agent pod yet"},
	}
	if len(r.Nodes) != len(want) {
		t.Fatalf("%d rows, want %d", len(r.Nodes), len(want))
	}
	for i, w := range want {
		n := r.Nodes[i]
		if n.Name != w.name || n.Ready != w.ready || strings.Join(n.Errors, "; ") != w.errors || n.State() != w.state {
			t.Errorf("row %d = {%s %v %q %q}, want {%s %v %q %q}", i, n.Name, n.Ready, strings.Join(n.Errors, "; "), n.State(), w.name, w.ready, w.errors, w.state)
		}
	}

	var buf bytes.Buffer
	if err := health.PrintTable(&buf, r, true); err != nil {
		t.Fatal(err)
	}
	wantTable := `NODE   READY   VERSION   KERNEL     ACTIVE      ERRORS                                                                FEATURES      POD
n1     true    v1        6.18.0-1   sockstats   -                                                                     cgroup_sock   kebpf-agent-n1
n2     false   v1        6.18.0-1   -           heartbeat stale (5m0s ago)                                            -             kebpf-agent-n2
n3     false   -         6.18.0     -           agent pod Pending (mount: ErrImageNeverPull); no NodeState reported   -             kebpf-agent-n3
n4     false   v1        6.18.0     -           no agent pod; attach sockstats: permission denied                     -             -
`
	if buf.String() != wantTable {
		t.Errorf("table:\n%s\nwant:\n%s", buf.String(), wantTable)
	}
	nr := strings.Join(r.NotReady(), ", ")
	if !strings.Contains(nr, "n3 (agent pod Pending (mount: ErrImageNeverPull); no NodeState reported)") || strings.Contains(nr, "n1") {
		t.Errorf("NotReady = %s", nr)
	}
}

func TestCollectNotInstalled(t *testing.T) {
	tests := []struct {
		name    string
		kube    []runtime.Object
		dyn     []runtime.Object
		missing string
	}{
		{name: "no namespace", missing: "namespace " + manifests.Namespace},
		{name: "no CRD", kube: []runtime.Object{testutil.Namespace()}, missing: "CRD " + manifests.CRDName},
		{name: "no DaemonSet", kube: []runtime.Object{testutil.Namespace()}, dyn: []runtime.Object{testutil.CRD()}, missing: "DaemonSet " + manifests.DaemonSetName},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, tt.kube, tt.dyn...)
			r, err := health.Collect(context.Background(), f.Clients, now)
			if err != nil {
				t.Fatal(err)
			}
			if r.Installed || r.Missing() != tt.missing {
				t.Errorf("installed=%v missing=%q, want false %q", r.Installed, r.Missing(), tt.missing)
			}
		})
	}
}

func TestHealthyNeedsRollout(t *testing.T) {
	fresh := metav1.NewTime(now)
	f := testutil.NewFake(t,
		[]runtime.Object{testutil.Namespace(), daemonSet(1, 1, 0), node("n1"), agentPod("n1", runningReady)},
		testutil.CRD(), testutil.NodeState("n1", apiv1.NodeStateStatus{Ready: true, Heartbeat: fresh}))
	r, err := health.Collect(context.Background(), f.Clients, now)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Nodes[0].Ready || r.Healthy() {
		t.Errorf("node ready=%v healthy=%v: an old-spec pod must not count as rolled out", r.Nodes[0].Ready, r.Healthy())
	}
}
