package install_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/install"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func envoyDaemonSet() *appsv1.DaemonSet {
	return &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: manifests.EnvoyDaemonSetName, Namespace: manifests.Namespace}}
}

func containerImages(t *testing.T, ds *unstructured.Unstructured) (initImage, envoyImage string) {
	t.Helper()
	ics, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "initContainers")
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	return ics[0].(map[string]any)["image"].(string), cs[0].(map[string]any)["image"].(string)
}

// The Envoy DaemonSet exists exactly while the config install writes
// enables l7; the Envoy image is recorded either way.
func TestInstallEnvoyFollowsL7(t *testing.T) {
	tests := []struct {
		name        string
		existing    []runtime.Object
		enable      []string
		disable     []string
		envoyImage  string
		wantEnvoy   bool   // the Envoy DaemonSet is applied
		wantDeleted bool   // an existing one is deleted
		wantOut     string // a line of stdout
	}{
		{name: "first install: l7 off, no Envoy", wantOut: "daemonset.apps/kebpf-agent created"},
		{name: "first install with --enable l7", enable: []string{"l7"}, envoyImage: "example.test/envoy:v2",
			wantEnvoy: true, wantOut: "daemonset.apps/kebpf-envoy created"},
		{name: "re-install keeps l7 on", existing: []runtime.Object{existingConfig("features:\n  l7: true\n  sockstats: true\n")},
			wantEnvoy: true, wantOut: "daemonset.apps/kebpf-envoy created"},
		{name: "re-install with --disable l7 deletes Envoy after the config",
			existing: []runtime.Object{existingConfig("features:\n  l7: true\n  sockstats: true\n"), envoyDaemonSet()}, disable: []string{"l7"},
			wantDeleted: true, wantOut: "configmap/kubectl-ebpf-config created"},
		{name: "a leftover Envoy goes when l7 is off", existing: []runtime.Object{envoyDaemonSet()},
			wantDeleted: true, wantOut: "daemonset.apps/kebpf-agent created\ndaemonset.apps/kebpf-envoy deleted (l7 is disabled)\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs := append([]runtime.Object{endpointSlice("kubernetes", discoveryv1.AddressTypeIPv4, "10.1.2.3", 6443)}, tt.existing...)
			f := testutil.NewFake(t, objs)
			got := f.RecordApplies()
			var out, errOut bytes.Buffer
			o := &install.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}, DryRun: "none", Timeout: time.Minute,
				Conn: kube.Conn{Clients: f.Clients}, Enable: tt.enable, Disable: tt.disable, EnvoyImage: tt.envoyImage}
			if err := testutil.RunOptions(t, o); err != nil {
				t.Fatalf("%v\n%s%s", err, out.String(), errOut.String())
			}
			wantImage := tt.envoyImage
			if wantImage == "" {
				wantImage = manifests.DefaultEnvoyImage
			}
			agent := got["DaemonSet/"+manifests.DaemonSetName]
			if rec := agent.GetAnnotations()[manifests.AnnotationEnvoyImage]; rec != wantImage {
				t.Errorf("recorded Envoy image %q, want %q", rec, wantImage)
			}
			envoy := got["DaemonSet/"+manifests.EnvoyDaemonSetName]
			if (envoy != nil) != tt.wantEnvoy {
				t.Fatalf("Envoy DaemonSet applied: %v, want %v\n%s", envoy != nil, tt.wantEnvoy, out.String())
			}
			if envoy != nil {
				initImage, envoyImage := containerImages(t, envoy)
				if initImage != kubeAgentImage(agent) || envoyImage != wantImage {
					t.Errorf("Envoy DaemonSet images: bootstrap %s envoy %s, want %s %s", initImage, envoyImage, kubeAgentImage(agent), wantImage)
				}
			}
			_, err := f.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(context.Background(), manifests.EnvoyDaemonSetName, metav1.GetOptions{})
			if tt.wantDeleted && err == nil {
				t.Error("the Envoy DaemonSet still exists")
			}
			deleted := strings.Contains(out.String(), "daemonset.apps/kebpf-envoy deleted (l7 is disabled)\n")
			if deleted != tt.wantDeleted {
				t.Errorf("stdout %q: deletion reported %v, want %v", out.String(), deleted, tt.wantDeleted)
			}
			// Deleted last: after the config that turns l7 off.
			if deleted && !strings.Contains(out.String(), "daemonset.apps/kebpf-envoy deleted (l7 is disabled)\nkubectl-ebpf installed (image "+o.Image+")\n") {
				t.Errorf("stdout %q: the deletion is not the last change", out.String())
			}
			if !strings.Contains(out.String(), tt.wantOut) {
				t.Errorf("stdout %q lacks %q", out.String(), tt.wantOut)
			}
		})
	}
}

func kubeAgentImage(ds *unstructured.Unstructured) string {
	var typed appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(ds.Object, &typed); err != nil {
		return err.Error()
	}
	return kube.AgentImage(&typed)
}

// --wait with l7 waits for every node's Envoy, and says so when it times out.
func TestWaitReadyWaitsForEnvoy(t *testing.T) {
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: manifests.ConfigMapName, Namespace: manifests.Namespace, CreationTimestamp: metav1.Now()},
		Data:       map[string]string{apiv1.ConfigKey: "features:\n  l7: true\n  sockstats: true\n"},
	}
	envoy := envoyDaemonSet()
	ns := testutil.NodeState("kebpf-node", apiv1.NodeStateStatus{Ready: true, Heartbeat: metav1.Now(), Active: []string{"sockstats", "l7"},
		L7: &apiv1.L7NodeStatus{Version: "v1"}})
	f := testutil.NewFake(t, []runtime.Object{
		testutil.Namespace(), testutil.DaemonSet("", 1, 1, 1), envoy, cm,
		testutil.AgentPod("kebpf-agent-x", "kebpf-node", testutil.RunningReady),
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}},
	}, testutil.CRD(), ns)
	var out bytes.Buffer
	err := install.WaitReady(context.Background(), f.Clients, genericiooptions.IOStreams{Out: &out}, 100*time.Millisecond, 20*time.Millisecond)
	if want := "timed out after 100ms: Envoy not ready on: kebpf-node"; err == nil || err.Error() != want {
		t.Errorf("err = %v\nwant %s", err, want)
	}
	if got, want := out.String(), "node kebpf-node: ready, converging (Envoy not ready (no Envoy pod))\n"; got != want {
		t.Errorf("progress %q, want %q", got, want)
	}
}
