package feature_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clienttesting "k8s.io/client-go/testing"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/feature"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

// agentDaemonSet is the installed agent DaemonSet, recording envoyImage
// ("" for an install by a plugin that did not record one).
func agentDaemonSet(envoyImage string) *appsv1.DaemonSet {
	ds := testutil.DaemonSet("example.test/agent:v7", 1, 1, 1)
	ds.Labels = map[string]string{manifests.LabelVersion: "v7"}
	if envoyImage != "" {
		ds.Annotations = map[string]string{manifests.AnnotationEnvoyImage: envoyImage}
	}
	return ds
}

func envoyDaemonSet() *appsv1.DaemonSet {
	return &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: manifests.EnvoyDaemonSetName, Namespace: manifests.Namespace}}
}

// order records, across the typed and dynamic clients, the writes in the
// order they happen.
func order(f *testutil.Fake) *[]string {
	var seen []string
	rec := func(a clienttesting.Action) (bool, runtime.Object, error) {
		switch a.GetVerb() {
		case "patch", "update", "create", "delete":
			if r := a.GetResource().Resource; r != "selfsubjectaccessreviews" {
				seen = append(seen, a.GetVerb()+" "+r)
			}
		}
		return false, nil, nil
	}
	f.Kube.PrependReactor("*", "*", rec)
	f.Dynamic.PrependReactor("*", "*", rec)
	return &seen
}

func TestEnableL7CreatesEnvoyFirst(t *testing.T) {
	tests := []struct {
		name      string
		agent     *appsv1.DaemonSet
		wantImage string
		wantWarn  string
	}{
		{name: "recorded image", agent: agentDaemonSet("example.test/envoy:v2"), wantImage: "example.test/envoy:v2"},
		{name: "install recorded none", agent: agentDaemonSet(""), wantImage: manifests.DefaultEnvoyImage,
			wantWarn: "warning: the install recorded no Envoy image (annotation kubectl-ebpf.io/envoy-image on DaemonSet kebpf-agent); using docker.io/envoyproxy/envoy:v1.40.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, []runtime.Object{configMap("features:\n  l7: false\n  sockstats: true\n"), tt.agent})
			got := f.RecordApplies()
			seen := order(f) // prepended last, so it sees every write first, then falls through
			o, out, errOut := newOpts(f, true)
			if err := testutil.RunOptions(t, o, "l7"); err != nil {
				t.Fatal(err)
			}
			if want := "daemonset.apps/kebpf-envoy created\nfeature l7 enabled\n"; out.String() != want {
				t.Errorf("stdout %q, want %q", out.String(), want)
			}
			if !strings.HasPrefix(errOut.String(), tt.wantWarn) || (tt.wantWarn == "") != (errOut.Len() == 0) {
				t.Errorf("stderr %q, want %q", errOut.String(), tt.wantWarn)
			}
			if want := []string{"patch daemonsets", "patch configmaps"}; !slices.Equal(*seen, want) {
				t.Errorf("writes %v, want %v (Envoy before the feature)", *seen, want)
			}
			ds := got["DaemonSet/"+manifests.EnvoyDaemonSetName]
			if ds == nil {
				t.Fatal("no Envoy DaemonSet applied")
			}
			ics, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "initContainers")
			cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
			if img := ics[0].(map[string]any)["image"]; img != "example.test/agent:v7" {
				t.Errorf("bootstrap image %v, want the installed agent's", img)
			}
			if img := cs[0].(map[string]any)["image"]; img != tt.wantImage {
				t.Errorf("Envoy image %v, want %s", img, tt.wantImage)
			}
			if v := ds.GetLabels()[manifests.LabelVersion]; v != "v7" {
				t.Errorf("version label %q, want the agent's v7", v)
			}
		})
	}
}

func TestEnableL7Fails(t *testing.T) {
	tests := []struct {
		name    string
		objs    []runtime.Object
		wantErr error
		wantMsg string
	}{
		{name: "not installed", wantErr: kube.ErrNotInstalled},
		{name: "no agent DaemonSet", objs: []runtime.Object{configMap("features:\n  sockstats: true\n")}, wantErr: kube.ErrNoAgentDaemonSet},
		{name: "hand-edited record", objs: []runtime.Object{configMap("features:\n  sockstats: true\n"), agentDaemonSet("not an image")},
			wantMsg: `DaemonSet kebpf-agent (annotation kubectl-ebpf.io/envoy-image): invalid Envoy image "not an image"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := testutil.NewFake(t, tt.objs)
			f.RecordApplies()
			o, out, _ := newOpts(f, true)
			err := testutil.RunOptions(t, o, "l7")
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) || tt.wantMsg != "" && (err == nil || !strings.HasPrefix(err.Error(), tt.wantMsg)) {
				t.Errorf("err = %v, want %v%s", err, tt.wantErr, tt.wantMsg)
			}
			// Nothing changed: the config is switched only after Envoy is applied.
			if m := f.Mutations(); len(m) > 0 || out.Len() > 0 {
				t.Errorf("mutations %v, stdout %q", m, out.String())
			}
		})
	}
}

func TestDisableL7DeletesEnvoyAfterTheConfig(t *testing.T) {
	tests := []struct {
		name, config string
		envoy        bool
		wantOut      string
		wantWrites   []string
	}{
		{name: "on", config: "features:\n  l7: true\n", envoy: true,
			wantOut: "feature l7 disabled\ndaemonset.apps/kebpf-envoy deleted\n", wantWrites: []string{"patch configmaps", "delete daemonsets"}},
		{name: "already off, Envoy left over", config: "features:\n  l7: false\n", envoy: true,
			wantOut: "feature l7 already disabled: nothing changed\ndaemonset.apps/kebpf-envoy deleted\n", wantWrites: []string{"delete daemonsets"}},
		{name: "already off, no Envoy", config: "features:\n  l7: false\n",
			wantOut: "feature l7 already disabled: nothing changed\n", wantWrites: []string{"delete daemonsets"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs := []runtime.Object{configMap(tt.config), agentDaemonSet("example.test/envoy:v2")}
			if tt.envoy {
				objs = append(objs, envoyDaemonSet())
			}
			f := testutil.NewFake(t, objs)
			seen := order(f)
			o, out, _ := newOpts(f, false)
			if err := testutil.RunOptions(t, o, "l7"); err != nil {
				t.Fatal(err)
			}
			if out.String() != tt.wantOut {
				t.Errorf("stdout %q, want %q", out.String(), tt.wantOut)
			}
			if !slices.Equal(*seen, tt.wantWrites) {
				t.Errorf("writes %v, want %v", *seen, tt.wantWrites)
			}
			if _, err := f.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(context.Background(), manifests.EnvoyDaemonSetName, metav1.GetOptions{}); err == nil {
				t.Error("Envoy DaemonSet still exists")
			}
			if _, err := f.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(context.Background(), manifests.DaemonSetName, metav1.GetOptions{}); err != nil {
				t.Errorf("agent DaemonSet: %v", err)
			}
		})
	}
}

func TestWaitNodesL7NeedsEnvoy(t *testing.T) {
	l7 := func(name string, ready bool) *apiv1.NodeState {
		return testutil.NodeState(name, apiv1.NodeStateStatus{Ready: true, Active: []string{"l7"}, L7: &apiv1.L7NodeStatus{EnvoyReady: ready, AckedVersion: "3"}})
	}
	f := testutil.NewFake(t, []runtime.Object{node("a"), node("b")}, l7("a", true), l7("b", false))
	var out strings.Builder
	err := feature.WaitNodes(context.Background(), f.Clients, genericiooptions.IOStreams{Out: &out}, "l7", true, 100*time.Millisecond, 10*time.Millisecond)
	if err == nil || err.Error() != "timed out after 100ms waiting for feature l7 to be active on node(s) b" {
		t.Errorf("err = %v", err)
	}
	if want := "node a: l7 active\nnode b: waiting (l7 active, Envoy not ready)\n"; out.String() != want {
		t.Errorf("progress %q, want %q", out.String(), want)
	}
}
