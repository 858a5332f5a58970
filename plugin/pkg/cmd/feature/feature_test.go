package feature_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clienttesting "k8s.io/client-go/testing"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/feature"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func configMap(config string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: manifests.ConfigMapName, Namespace: manifests.Namespace, Labels: manifests.CommonLabels()},
		Data:       map[string]string{apiv1.ConfigKey: config},
	}
}

func nodeState(name string, active ...string) *apiv1.NodeState {
	return testutil.NodeState(name, apiv1.NodeStateStatus{Ready: true, Active: active})
}

func node(name string) *corev1.Node { return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}} }

func newOpts(f *testutil.Fake, enable bool, args ...string) (*feature.Options, *bytes.Buffer, *bytes.Buffer) {
	var out, errOut bytes.Buffer
	o := &feature.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}, Enable: enable, Timeout: time.Second, PollInterval: 10 * time.Millisecond}
	if f != nil {
		o.Clients = f.Clients
	}
	return o, &out, &errOut
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		timeout time.Duration
		wantErr string
	}{
		{name: "known", args: []string{"service-lb"}, timeout: time.Minute},
		{name: "unknown", args: []string{"sockstat"}, timeout: time.Minute, wantErr: `unknown feature "sockstat": known features are sockstats, service-lb, policy, l7`},
		{name: "none", timeout: time.Minute, wantErr: "enable needs exactly one feature, one of: sockstats, service-lb, policy, l7"},
		{name: "two", args: []string{"sockstats", "service-lb"}, timeout: time.Minute, wantErr: "enable needs exactly one feature"},
		{name: "bad timeout", args: []string{"sockstats"}, wantErr: "invalid --timeout 0s: must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, _, _ := newOpts(nil, true)
			o.Timeout = tt.timeout
			err := o.Complete(tt.args)
			if err == nil {
				err = o.Validate()
			}
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || !strings.HasPrefix(err.Error(), tt.wantErr)) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// The kubeconfig points nowhere: a bad feature must be reported before any
// attempt to reach the cluster.
func TestBadInputMakesNoAPICall(t *testing.T) {
	for _, args := range [][]string{
		{"enable", "bogus"},
		{"disable", "bogus"},
		{"enable"},
		{"disable", "sockstats", "--timeout", "0s"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			line := testutil.FailsBeforeAPICall(t, args...)
			if len(args) > 1 && args[1] == "bogus" && !strings.Contains(line, "known features are sockstats, service-lb, policy, l7") {
				t.Errorf("error does not list the known features: %q", line)
			}
		})
	}
}

func TestCompletion(t *testing.T) {
	for _, verb := range []string{"enable", "disable"} {
		t.Run(verb, func(t *testing.T) {
			r := testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "__complete", verb, "")
			if r.Code != 0 {
				t.Fatal(r)
			}
			for _, f := range apiv1.KnownFeatures {
				if !strings.Contains(r.Stdout, f+"\n") {
					t.Errorf("completion lacks %s: %q", f, r.Stdout)
				}
			}
			r = testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "__complete", verb, "sockstats", "")
			if strings.Contains(r.Stdout, "service-lb") {
				t.Errorf("completes a second feature: %q", r.Stdout)
			}
		})
	}
}

func TestSwitch(t *testing.T) {
	tests := []struct {
		name       string
		config     string
		enable     bool
		feature    string
		wantConfig string // config.yaml afterwards
		wantOut    string
		wantWarn   string
		wantWrite  bool
	}{
		{name: "disable", config: "features:\n  service-lb: true\n  sockstats: true\n", feature: "service-lb",
			wantConfig: "features:\n  service-lb: false\n  sockstats: true\n", wantOut: "feature service-lb disabled\n", wantWrite: true},
		{name: "enable", config: "features:\n  service-lb: false\n  sockstats: true\n", enable: true, feature: "service-lb",
			wantConfig: "features:\n  service-lb: true\n  sockstats: true\n", wantOut: "feature service-lb enabled\n", wantWrite: true},
		{name: "enable a feature missing from the map", config: "features:\n  sockstats: false\n", enable: true, feature: "service-lb",
			wantConfig: "features:\n  service-lb: true\n  sockstats: false\n", wantOut: "feature service-lb enabled\n", wantWrite: true},
		{name: "already disabled", config: "features:\n  service-lb: false\n  sockstats: true\n", feature: "service-lb",
			wantConfig: "features:\n  service-lb: false\n  sockstats: true\n", wantOut: "feature service-lb already disabled: nothing changed\n"},
		{name: "absent counts as disabled", config: "features:\n  sockstats: true\n", feature: "service-lb",
			wantConfig: "features:\n  sockstats: true\n", wantOut: "feature service-lb already disabled: nothing changed\n"},
		{name: "already enabled", config: "features:\n  service-lb: true\n  sockstats: true\n", enable: true, feature: "sockstats",
			wantConfig: "features:\n  service-lb: true\n  sockstats: true\n", wantOut: "feature sockstats already enabled: nothing changed\n"},
		{name: "unknown names dropped", config: "features:\n  bogus: true\n  sockstats: true\n", enable: true, feature: "service-lb",
			wantConfig: "features:\n  service-lb: true\n  sockstats: true\n", wantOut: "feature service-lb enabled\n",
			wantWarn: "warning: removed unknown feature(s) bogus from the config (known: sockstats, service-lb, policy, l7)\n", wantWrite: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, []runtime.Object{configMap(tt.config)})
			o, out, errOut := newOpts(f, tt.enable)
			if err := testutil.RunOptions(t, o, tt.feature); err != nil {
				t.Fatal(err)
			}
			if out.String() != tt.wantOut || errOut.String() != tt.wantWarn {
				t.Errorf("stdout %q stderr %q, want %q %q", out.String(), errOut.String(), tt.wantOut, tt.wantWarn)
			}
			cm, err := f.Kube.CoreV1().ConfigMaps(manifests.Namespace).Get(context.Background(), manifests.ConfigMapName, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := cm.Data[apiv1.ConfigKey]; got != tt.wantConfig {
				t.Errorf("config.yaml = %q, want %q", got, tt.wantConfig)
			}
			if len(cm.Labels) != len(manifests.CommonLabels()) {
				t.Errorf("labels changed: %v", cm.Labels)
			}
			if m := f.Mutations(); (len(m) > 0) != tt.wantWrite {
				t.Errorf("mutations %v, want a write: %v", m, tt.wantWrite)
			}
		})
	}
}

func TestNotInstalled(t *testing.T) {
	f := testutil.NewFake(t, nil)
	o, out, _ := newOpts(f, true)
	err := testutil.RunOptions(t, o, "service-lb")
	if !errors.Is(err, kube.ErrNotInstalled) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("err = %v, want one-line %v", err, kube.ErrNotInstalled)
	}
	if out.Len() > 0 || len(f.Mutations()) > 0 {
		t.Errorf("printed %q, mutations %v", out.String(), f.Mutations())
	}
}

func TestUnparsableConfigIsAnError(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{configMap("features: [")})
	o, _, _ := newOpts(f, true)
	err := testutil.RunOptions(t, o, "service-lb")
	if err == nil || !strings.Contains(err.Error(), `run "kubectl ebpf install" to reset it`) {
		t.Fatalf("err = %v", err)
	}
	if len(f.Mutations()) > 0 {
		t.Errorf("mutations %v", f.Mutations())
	}
}

// A concurrent writer (another enable, kubectl edit) makes the first update
// conflict; the retry must re-read and keep the other writer's change.
func TestConflictRetryKeepsConcurrentChange(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{configMap("features:\n  service-lb: true\n  sockstats: true\n")})
	conflicted := false
	f.Kube.PrependReactor("patch", "configmaps", func(a clienttesting.Action) (bool, runtime.Object, error) {
		if conflicted {
			return false, nil, nil
		}
		conflicted = true
		// Someone else disables sockstats between our read and our write.
		cm := configMap("features:\n  service-lb: true\n  sockstats: false\n")
		if err := f.Kube.Tracker().Update(schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, cm, cm.Namespace); err != nil {
			t.Error(err)
		}
		return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "configmaps"}, cm.Name, errors.New("the object has been modified"))
	})
	o, _, _ := newOpts(f, false)
	if err := testutil.RunOptions(t, o, "service-lb"); err != nil {
		t.Fatal(err)
	}
	cm, _ := f.Kube.CoreV1().ConfigMaps(manifests.Namespace).Get(context.Background(), manifests.ConfigMapName, metav1.GetOptions{})
	if got, want := cm.Data[apiv1.ConfigKey], "features:\n  service-lb: false\n  sockstats: false\n"; got != want {
		t.Errorf("config.yaml = %q, want %q (lost the concurrent change?)", got, want)
	}
}

func TestWaitNodes(t *testing.T) {
	tests := []struct {
		name    string
		enable  bool
		objs    []runtime.Object
		states  func(t *testing.T) []runtime.Object
		wantErr string
		wantOut []string
	}{
		{name: "enable converged", enable: true, objs: []runtime.Object{node("a"), node("b")},
			states: func(t *testing.T) []runtime.Object {
				return []runtime.Object{nodeState("a", "sockstats", "service-lb"), nodeState("b", "service-lb")}
			},
			wantOut: []string{"node a: service-lb active\n", "node b: service-lb active\n", "feature service-lb active on 2 node(s)\n"}},
		{name: "enable timeout names the nodes", enable: true, objs: []runtime.Object{node("a"), node("b"), node("c")},
			states: func(t *testing.T) []runtime.Object {
				return []runtime.Object{nodeState("a", "service-lb"), nodeState("b", "sockstats")}
			},
			wantErr: "timed out after 100ms waiting for feature service-lb to be active on node(s) b, c",
			wantOut: []string{"node a: service-lb active\n", "node b: waiting (active: sockstats)\n", "node c: waiting (no NodeState reported)\n"}},
		{name: "disable converged", objs: []runtime.Object{node("a")},
			states:  func(t *testing.T) []runtime.Object { return []runtime.Object{nodeState("a", "sockstats")} },
			wantOut: []string{"node a: service-lb inactive\n", "feature service-lb inactive on 1 node(s)\n"}},
		{name: "disable still attached", objs: []runtime.Object{node("a")},
			states: func(t *testing.T) []runtime.Object {
				return []runtime.Object{nodeState("a", "sockstats", "service-lb")}
			},
			wantErr: "timed out after 100ms waiting for feature service-lb to be inactive on node(s) a",
			wantOut: []string{"node a: waiting (active: sockstats,service-lb)\n"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, tt.objs, tt.states(t)...)
			var out bytes.Buffer
			err := feature.WaitNodes(context.Background(), f.Clients, genericiooptions.IOStreams{Out: &out}, "service-lb", tt.enable, 100*time.Millisecond, 10*time.Millisecond)
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
			if got := strings.Join(tt.wantOut, ""); out.String() != got {
				t.Errorf("progress:\n%q\nwant (each state once):\n%q", out.String(), got)
			}
		})
	}
}

func TestEnableWaitFollowsTheAgent(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{configMap("features:\n  service-lb: false\n  sockstats: true\n"), node("a")}, nodeState("a", "sockstats"))
	// The fake agent attaches the feature once it sees the ConfigMap change.
	go func() {
		for range 200 {
			cm, err := f.Kube.CoreV1().ConfigMaps(manifests.Namespace).Get(context.Background(), manifests.ConfigMapName, metav1.GetOptions{})
			if err == nil && strings.Contains(cm.Data[apiv1.ConfigKey], "service-lb: true") {
				if _, err := f.EBPF.EbpfV1alpha1().NodeStates().Update(context.Background(), nodeState("a", "sockstats", "service-lb"), metav1.UpdateOptions{}); err != nil {
					t.Error(err)
				}
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	o, out, _ := newOpts(f, true)
	o.Wait = true
	if err := testutil.RunOptions(t, o, "service-lb"); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	// Whether the "waiting" line appears depends on who polls first.
	got := out.String()
	if !strings.HasPrefix(got, "feature service-lb enabled\n") || !strings.HasSuffix(got, "node a: service-lb active\nfeature service-lb active on 1 node(s)\n") {
		t.Errorf("stdout:\n%s", got)
	}
}
