package install_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/install"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		opts    install.Options
		wantErr string
	}{
		{name: "defaults", opts: install.Options{DryRun: "none", Timeout: time.Minute}},
		{name: "yaml", opts: install.Options{DryRun: "client", Output: "yaml", Timeout: time.Minute}},
		{name: "bad dry-run", opts: install.Options{DryRun: "maybe", Timeout: time.Minute}, wantErr: `invalid --dry-run "maybe": want none, client or server`},
		{name: "bad output", opts: install.Options{DryRun: "none", Output: "json", Timeout: time.Minute}, wantErr: `invalid output format "json": want one of yaml`},
		{name: "bad timeout", opts: install.Options{DryRun: "none"}, wantErr: "invalid --timeout 0s: must be positive"},
		{name: "wait with dry run", opts: install.Options{DryRun: "server", Wait: true, Timeout: time.Minute}, wantErr: "--wait cannot be combined with --dry-run or -o"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.opts.Validate()
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// Bad input must fail before any API call: the kubeconfig here points nowhere.
func TestBadInputMakesNoAPICall(t *testing.T) {
	for _, args := range [][]string{
		{"install", "--dry-run=sometimes"},
		{"install", "-o", "json"},
		{"install", "--bogus"},
		{"install", "--envoy-image", "envoy proxy"},
		{"install", "--envoy-image", "Envoy:v1"},
		{"status", "-o", "table"},
		{"version", "-o", "xml"},
		{"frobnicate"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			testutil.FailsBeforeAPICall(t, args...)
		})
	}
}

func TestPreflightFailureAppliesNothing(t *testing.T) {
	oldNode := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "old"}, Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KernelVersion: "5.4.0-150-generic"}}}
	newNode := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "new"}, Status: corev1.NodeStatus{NodeInfo: corev1.NodeSystemInfo{KernelVersion: "6.18.0"}}}
	tests := []struct {
		name    string
		nodes   []runtime.Object
		deny    bool
		wantErr string
	}{
		{name: "old kernel", nodes: []runtime.Object{newNode, oldNode}, wantErr: "unsupported kernel: kubectl-ebpf needs Linux 5.10 or newer: old (kernel 5.4.0-150-generic)"},
		{name: "no permission", nodes: []runtime.Object{newNode}, deny: true, wantErr: "missing permissions: cannot create namespaces, patch namespaces, get namespaces, create customresourcedefinitions.apiextensions.k8s.io, and"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, tt.nodes)
			if tt.deny {
				testutil.DenyAll(f.Kube)
			}
			var out bytes.Buffer
			o := &install.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, DryRun: "none", Timeout: time.Minute, Conn: kube.Conn{Clients: f.Clients}}
			err := testutil.RunOptions(t, o)
			if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want prefix %q", err, tt.wantErr)
			}
			if m := f.Mutations(); len(m) > 0 {
				t.Errorf("preflight failed but the cluster was changed: %v", m)
			}
			if out.Len() > 0 {
				t.Errorf("printed %q", out.String())
			}
		})
	}
}

func TestWaitReadyTimeoutNamesNodesAndReasons(t *testing.T) {
	ds := testutil.DaemonSet("", 1, 0, 0)
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "kebpf-agent-x", Namespace: manifests.Namespace, Labels: map[string]string{manifests.LabelName: manifests.DaemonSetName}},
		Spec:       corev1.PodSpec{NodeName: "kebpf-node"},
		Status: corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{{
			Name: "agent", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImageNeverPull"}},
		}}},
	}
	f := testutil.NewFake(t, []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: manifests.Namespace}}, ds, pod,
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}},
	}, testutil.CRD())
	var out bytes.Buffer
	err := install.WaitReady(context.Background(), f.Clients, genericiooptions.IOStreams{Out: &out}, 100*time.Millisecond, 20*time.Millisecond)
	want := "timed out after 100ms: not ready: kebpf-node (agent pod Pending (agent: ErrImageNeverPull); no NodeState reported)"
	if err == nil || err.Error() != want {
		t.Errorf("err = %v\nwant %s", err, want)
	}
	if got := out.String(); got != "node kebpf-node: agent Pending (agent: ErrImageNeverPull)\n" {
		t.Errorf("progress = %q (each state once)", got)
	}
}

func TestWaitReadyWaitsForConfiguredFeatures(t *testing.T) {
	ds := testutil.DaemonSet("", 1, 1, 1)
	pod := testutil.AgentPod("kebpf-agent-x", "kebpf-node", testutil.RunningReady)
	// Just written: within the grace period, so the node is ready but not
	// yet running service-lb.
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: manifests.ConfigMapName, Namespace: manifests.Namespace, CreationTimestamp: metav1.Now()},
		Data:       map[string]string{apiv1.ConfigKey: "features:\n  service-lb: true\n  sockstats: true\n"},
	}
	ns := testutil.NodeState("kebpf-node", apiv1.NodeStateStatus{Ready: true, Heartbeat: metav1.Now(), Active: []string{"sockstats"}})
	f := testutil.NewFake(t, []runtime.Object{
		testutil.Namespace(), ds, pod, cm,
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}},
	}, testutil.CRD(), ns)
	var out bytes.Buffer
	err := install.WaitReady(context.Background(), f.Clients, genericiooptions.IOStreams{Out: &out}, 100*time.Millisecond, 20*time.Millisecond)
	want := "timed out after 100ms: features service-lb,sockstats not active on: kebpf-node (active sockstats)"
	if err == nil || err.Error() != want {
		t.Errorf("err = %v\nwant %s", err, want)
	}
	if got := out.String(); !strings.HasPrefix(got, "node kebpf-node: ready, converging (active sockstats, configured service-lb,sockstats)\n") {
		t.Errorf("progress = %q", got)
	}
}

// A plugin that does not know which build it is refuses to install its
// default image (a tag that exists nowhere) before any API call, and says
// how to get one that does; --image or -o yaml still work.
func TestInstallRefusesUnknownVersion(t *testing.T) {
	src := manifests.VersionSource
	manifests.VersionSource = manifests.SourceNone
	t.Cleanup(func() { manifests.VersionSource = src })
	o := install.Options{DryRun: install.DryRunNone, Timeout: time.Minute, Image: manifests.DefaultImage()}
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "built without version information") || !strings.Contains(err.Error(), "--image") {
		t.Errorf("Validate = %v, want the no-version refusal naming --image", err)
	}
	o.Image = "registry.example/agent:v1"
	if err := o.Validate(); err != nil {
		t.Errorf("with --image: %v", err)
	}
	o.Image, o.Output = manifests.DefaultImage(), "yaml"
	if err := o.Validate(); err != nil {
		t.Errorf("with -o yaml: %v", err)
	}
}
