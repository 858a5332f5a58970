package kube

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func TestParseKernel(t *testing.T) {
	tests := []struct {
		release      string
		major, minor int
		ok           bool
	}{
		{"6.18.0-1-amd64", 6, 18, true},
		{"5.10.0", 5, 10, true},
		{"5.4.0-150-generic", 5, 4, true},
		{"4.19.0+", 4, 19, true},
		{"6.1-rc3", 6, 1, true},
		{"", 0, 0, false},
		{"six.two", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.release, func(t *testing.T) {
			major, minor, ok := ParseKernel(tt.release)
			if major != tt.major || minor != tt.minor || ok != tt.ok {
				t.Errorf("ParseKernel(%q) = %d, %d, %v; want %d, %d, %v", tt.release, major, minor, ok, tt.major, tt.minor, tt.ok)
			}
		})
	}
}

func TestCheckKernels(t *testing.T) {
	node := func(name, kernel string) corev1.Node {
		return corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KernelVersion: kernel}}}
	}
	tests := []struct {
		name    string
		nodes   []corev1.Node
		wantErr string
	}{
		{name: "no nodes"},
		{name: "all new", nodes: []corev1.Node{node("a", "6.18.0"), node("b", "5.10.0-28-amd64")}},
		{name: "one old", nodes: []corev1.Node{node("a", "6.18.0"), node("old", "5.4.0-150-generic")}, wantErr: "old (kernel 5.4.0-150-generic)"},
		{name: "unparsable", nodes: []corev1.Node{node("x", "weird")}, wantErr: `x (kernel "weird" unrecognised)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckKernels(tt.nodes)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "5.10") {
				t.Errorf("err = %v, want it to contain %q and the minimum 5.10", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "a (") {
				t.Errorf("err names a supported node: %v", err)
			}
		})
	}
}

func TestPermissionErrorIsOneLine(t *testing.T) {
	var missing []Permission
	missing = append(missing, Permissions("", "", []string{"namespaces"}, []string{"create", "patch"})...)
	missing = append(missing, Permissions("ns", "apps", []string{"daemonsets"}, []string{"create", "patch", "get"})...)
	msg := (&PermissionError{Missing: missing}).Error()
	want := "missing permissions: cannot create namespaces, patch namespaces, create daemonsets.apps in ns, patch daemonsets.apps in ns, and 1 more (run as a cluster admin)"
	if msg != want {
		t.Errorf("got  %q\nwant %q", msg, want)
	}
}

func TestPodSummary(t *testing.T) {
	waiting := func(reason string) corev1.ContainerStatus {
		return corev1.ContainerStatus{Name: "agent", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason}}}
	}
	tests := []struct {
		name      string
		status    corev1.PodStatus
		want      string
		wantStuck bool
	}{
		{name: "image never pulled", status: corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{waiting("ErrImageNeverPull")}}, want: "Pending (agent: ErrImageNeverPull)", wantStuck: true},
		{name: "crash loop", status: corev1.PodStatus{Phase: corev1.PodRunning, ContainerStatuses: []corev1.ContainerStatus{waiting("CrashLoopBackOff")}}, want: "Running (agent: CrashLoopBackOff)", wantStuck: true},
		{name: "creating", status: corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{waiting("ContainerCreating")}}, want: "Pending"},
		{name: "unschedulable", status: corev1.PodStatus{Phase: corev1.PodPending, Conditions: []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: "Unschedulable"}}}, want: "Pending (Unschedulable)"},
		{name: "running not ready", status: corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}}, want: "Running, not ready"},
		{name: "running ready", status: corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}, want: "Running"},
		{name: "succeeded", status: corev1.PodStatus{Phase: corev1.PodSucceeded}, want: "Succeeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, stuck := PodSummary(&corev1.Pod{Status: tt.status})
			if got != tt.want || stuck != tt.wantStuck {
				t.Errorf("PodSummary = %q, %v; want %q, %v", got, stuck, tt.want, tt.wantStuck)
			}
		})
	}
}

func TestSameApply(t *testing.T) {
	obj := func(rv string, mutate func(u *unstructured.Unstructured)) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "v1", "kind": "Thing",
			"metadata": map[string]any{"name": "x", "generation": int64(1)},
			"spec":     map[string]any{"a": "1"},
		}}
		u.SetResourceVersion(rv)
		ts := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		u.SetManagedFields([]metav1.ManagedFieldsEntry{
			{Manager: "kubectl-ebpf", Operation: metav1.ManagedFieldsOperationApply, Time: &ts, FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:spec":{}}`)}},
		})
		if mutate != nil {
			mutate(u)
		}
		return u
	}
	tests := []struct {
		name          string
		before, after *unstructured.Unstructured
		want          bool
	}{
		{"same resourceVersion", obj("1", nil), obj("1", func(u *unstructured.Unstructured) { u.Object["spec"] = "ignored" }), true},
		{"status write in between", obj("1", nil), obj("2", func(u *unstructured.Unstructured) {
			u.Object["status"] = map[string]any{"observedGeneration": int64(1)}
		}), true},
		{"our entry rewritten, nothing else", obj("1", nil), obj("2", func(u *unstructured.Unstructured) {
			ts := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 1, 0, time.UTC))
			u.SetManagedFields([]metav1.ManagedFieldsEntry{
				{Manager: "status-controller", Operation: metav1.ManagedFieldsOperationApply, Subresource: "status", FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:status":{}}`)}},
				{Manager: "kubectl-ebpf", Operation: metav1.ManagedFieldsOperationApply, Time: &ts, FieldsV1: &metav1.FieldsV1{Raw: []byte(`{"f:spec":{}}`)}},
			})
		}), true},
		{"spec changed", obj("1", nil), obj("2", func(u *unstructured.Unstructured) {
			u.Object["spec"] = map[string]any{"a": "2"}
			u.SetGeneration(2)
		}), false},
		{"label changed", obj("1", nil), obj("2", func(u *unstructured.Unstructured) { u.SetLabels(map[string]string{"v": "2"}) }), false},
		{"data changed (no generation)", obj("1", func(u *unstructured.Unstructured) { u.Object["data"] = map[string]any{"k": "a"} }),
			obj("2", func(u *unstructured.Unstructured) { u.Object["data"] = map[string]any{"k": "b"} }), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := SameApply(tt.before, tt.after); got != tt.want {
				t.Errorf("SameApply = %v, want %v", got, tt.want)
			}
		})
	}
}
