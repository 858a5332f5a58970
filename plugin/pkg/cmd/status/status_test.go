package status_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/nodestate"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/status"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

var now = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func cluster(t *testing.T, ready bool) *testutil.Fake {
	t.Helper()
	crd := &unstructured.Unstructured{}
	crd.SetAPIVersion("apiextensions.k8s.io/v1")
	crd.SetKind("CustomResourceDefinition")
	crd.SetName(manifests.CRDName)
	ns, err := nodestate.ToUnstructured(&nodestate.NodeState{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}, Status: nodestate.Status{
		AgentVersion: "dev", Kernel: "6.18.0", Ready: ready, Heartbeat: metav1.NewTime(now), Active: []string{"sockstats"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return testutil.NewFake(t, []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: manifests.Namespace}},
		&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: manifests.DaemonSetName, Namespace: manifests.Namespace},
			Status: appsv1.DaemonSetStatus{DesiredNumberScheduled: 1, NumberReady: 1, UpdatedNumberScheduled: 1}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}},
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kebpf-agent-abc", Namespace: manifests.Namespace, Labels: map[string]string{manifests.LabelName: manifests.DaemonSetName}},
			Spec:       corev1.PodSpec{NodeName: "kebpf-node"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
		},
	}, crd, ns)
}

func run(t *testing.T, f *testutil.Fake, output string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	o := &status.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, Output: output, Timeout: time.Second, Clients: f.Clients, Now: func() time.Time { return now }}
	if err := o.Complete(); err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	err := o.Run(context.Background())
	return out.String(), err
}

func TestStatus(t *testing.T) {
	tests := []struct {
		name    string
		ready   bool
		output  string
		want    string
		wantErr error
	}{
		{name: "healthy", ready: true, want: "NODE         READY   VERSION   KERNEL   ACTIVE      ERRORS\nkebpf-node   true    dev       6.18.0   sockstats   -\n"},
		{name: "wide", ready: true, output: "wide", want: "NODE         READY   VERSION   KERNEL   ACTIVE      ERRORS   FEATURES   POD\nkebpf-node   true    dev       6.18.0   sockstats   -        -          kebpf-agent-abc\n"},
		{name: "unhealthy exits 1 after the table", ready: false, want: "NODE         READY   VERSION   KERNEL   ACTIVE      ERRORS\nkebpf-node   false   dev       6.18.0   sockstats   agent reports not ready\n", wantErr: cmdutil.ErrUnhealthy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := run(t, cluster(t, tt.ready), tt.output)
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want %v", err, tt.wantErr)
			}
			if out != tt.want {
				t.Errorf("output:\n%q\nwant:\n%q", out, tt.want)
			}
		})
	}
}

func TestStatusJSON(t *testing.T) {
	out, err := run(t, cluster(t, true), "json")
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(got)
	want := `{"daemonSet":{"desired":1,"image":"","name":"kebpf-agent","ready":1,"updated":1},"installed":true,"nodes":[{"active":["sockstats"],"errors":[],"features":[],"kernel":"6.18.0","name":"kebpf-node","pod":"kebpf-agent-abc","ready":true,"version":"dev"}]}`
	if string(b) != want {
		t.Errorf("json:\n%s\nwant:\n%s", b, want)
	}
}

func TestStatusNotInstalled(t *testing.T) {
	f := testutil.NewFake(t, nil)
	out, err := run(t, f, "")
	if !errors.Is(err, status.ErrNotInstalled) || out != "" {
		t.Errorf("out %q err %v", out, err)
	}
	out, err = run(t, f, "yaml")
	if !errors.Is(err, status.ErrNotInstalled) || !strings.HasPrefix(out, "daemonSet:") || !strings.Contains(out, "installed: false") {
		t.Errorf("yaml: out %q err %v", out, err)
	}
}
