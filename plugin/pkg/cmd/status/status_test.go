package status_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/utils/ptr"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/status"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

var now = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

func cluster(t *testing.T, ready bool) *testutil.Fake {
	t.Helper()
	return clusterWithConfig(t, ready, []string{"sockstats"}, "features:\n  sockstats: true\n  service-lb: false\n", time.Hour)
}

// clusterWithConfig is a one-node cluster whose agent reports active, with
// config.yaml written changedAgo before now.
func clusterWithConfig(t *testing.T, ready bool, active []string, config string, changedAgo time.Duration) *testutil.Fake {
	t.Helper()
	return testutil.NewFake(t, oneNode(config, changedAgo), testutil.CRD(), agentState(ready, active...))
}

// oneNode is an installed one-node cluster (agent running, no NodeState)
// whose config.yaml was written changedAgo before now.
func oneNode(config string, changedAgo time.Duration) []runtime.Object {
	return []runtime.Object{
		testutil.Namespace(),
		testutil.DaemonSet("", 1, 1, 1),
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}},
		testutil.AgentPod("kebpf-agent-abc", "kebpf-node", testutil.RunningReady),
		&corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: manifests.ConfigMapName, Namespace: manifests.Namespace,
				CreationTimestamp: metav1.NewTime(now.Add(-24 * time.Hour)),
				ManagedFields: []metav1.ManagedFieldsEntry{
					{Manager: manifests.FieldManager, Operation: metav1.ManagedFieldsOperationApply, Time: ptr.To(metav1.NewTime(now.Add(-24 * time.Hour)))},
					{Manager: manifests.FieldManager, Operation: metav1.ManagedFieldsOperationUpdate, Time: ptr.To(metav1.NewTime(now.Add(-changedAgo)))},
				}},
			Data: map[string]string{apiv1.ConfigKey: config},
		},
	}
}

func agentState(ready bool, active ...string) *apiv1.NodeState {
	return testutil.NodeState("kebpf-node", apiv1.NodeStateStatus{
		AgentVersion: "dev", Kernel: "6.18.0", Ready: ready, Heartbeat: metav1.NewTime(now), Active: active,
	})
}

func run(t *testing.T, f *testutil.Fake, output string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	o := &status.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, Output: output, Timeout: time.Second, Conn: kube.Conn{Clients: f.Clients}, Now: func() time.Time { return now }}
	err := testutil.RunOptions(t, o)
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
	want := `{"configured":["sockstats"],"daemonSet":{"desired":1,"image":"","name":"kebpf-agent","ready":1,"updated":1},"installed":true,"nodes":[{"active":["sockstats"],"converged":true,"errors":[],"features":[],"kernel":"6.18.0","name":"kebpf-node","pod":"kebpf-agent-abc","ready":true,"version":"dev"}]}`
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
	if !errors.Is(err, status.ErrNotInstalled) || !strings.Contains(out, "daemonSet:\n") || !strings.Contains(out, "installed: false") {
		t.Errorf("yaml: out %q err %v", out, err)
	}
}

func TestStatusConvergence(t *testing.T) {
	const both = "features:\n  service-lb: true\n  sockstats: true\n"
	tests := []struct {
		name       string
		active     []string
		config     string
		changedAgo time.Duration
		wantErr    error
		wantRow    string
		wantJSON   string // configured and the node's converged, as JSON
	}{
		{name: "converged", active: []string{"service-lb", "sockstats"}, config: both, changedAgo: time.Hour,
			wantRow: "kebpf-node   true    dev       6.18.0   service-lb,sockstats   -", wantJSON: `["service-lb","sockstats"] true`},
		{name: "order and duplicates do not matter", active: []string{"sockstats", "service-lb", "sockstats"}, config: both, changedAgo: time.Hour,
			wantJSON: `["service-lb","sockstats"] true`},
		{name: "just enabled: still within the grace period", active: []string{"sockstats"}, config: both, changedAgo: 10 * time.Second,
			wantRow: "kebpf-node   true    dev       6.18.0   sockstats   -", wantJSON: `["service-lb","sockstats"] false`},
		{name: "enabled long ago, never attached", active: []string{"sockstats"}, config: both, changedAgo: 45 * time.Second, wantErr: cmdutil.ErrUnhealthy,
			wantRow:  "kebpf-node   false   dev       6.18.0   sockstats   features not converged 45s after the config changed: active sockstats, configured service-lb,sockstats",
			wantJSON: `["service-lb","sockstats"] false`},
		{name: "disabled but still attached", active: []string{"service-lb", "sockstats"}, config: "features:\n  service-lb: false\n  sockstats: true\n", changedAgo: time.Minute, wantErr: cmdutil.ErrUnhealthy,
			wantRow:  "features not converged 1m0s after the config changed: active service-lb,sockstats, configured sockstats",
			wantJSON: `["sockstats"] false`},
		{name: "everything off", config: "features: {}\n", changedAgo: time.Hour, wantJSON: `[] true`},
		{name: "invalid config", active: []string{"sockstats"}, config: "features:\n  bogus: true\n", changedAgo: time.Hour, wantErr: cmdutil.ErrUnhealthy,
			wantRow: "config: ConfigMap kubectl-ebpf-config: parse config.yaml: unknown feature(s) bogus (known: sockstats, service-lb, policy, l7)", wantJSON: `null true`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := clusterWithConfig(t, true, tt.active, tt.config, tt.changedAgo)
			out, err := run(t, f, "")
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(out, tt.wantRow) {
				t.Errorf("table:\n%s\nwant a line containing %q", out, tt.wantRow)
			}
			out, _ = run(t, f, "json")
			var got struct {
				Configured []string `json:"configured"`
				Nodes      []struct {
					Converged bool `json:"converged"`
				} `json:"nodes"`
			}
			if err := json.Unmarshal([]byte(out), &got); err != nil || len(got.Nodes) != 1 {
				t.Fatalf("json %q: %v", out, err)
			}
			b, _ := json.Marshal(got.Configured)
			if s := fmt.Sprintf("%s %t", b, got.Nodes[0].Converged); s != tt.wantJSON {
				t.Errorf("configured, converged = %s, want %s", s, tt.wantJSON)
			}
		})
	}
}

func TestStatusWaitWaitsForConvergence(t *testing.T) {
	// Healthy within the grace period, but --wait wants the feature attached.
	f := clusterWithConfig(t, true, []string{"sockstats"}, "features:\n  service-lb: true\n  sockstats: true\n", 5*time.Second)
	go func() {
		time.Sleep(50 * time.Millisecond)
		_, err := f.EBPF.EbpfV1alpha1().NodeStates().Update(context.Background(), agentState(true, "sockstats", "service-lb"), metav1.UpdateOptions{})
		if err != nil {
			t.Error(err)
		}
	}()
	var out bytes.Buffer
	o := &status.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, Wait: true, Timeout: 5 * time.Second, PollInterval: 10 * time.Millisecond, Conn: kube.Conn{Clients: f.Clients}, Now: func() time.Time { return now }}
	if err := testutil.RunOptions(t, o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "sockstats,service-lb") {
		t.Errorf("status --wait returned before the node converged:\n%s", out.String())
	}
}
