package uninstall_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clienttesting "k8s.io/client-go/testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/uninstall"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func readyNode(name string, ready bool) *corev1.Node {
	s := corev1.ConditionTrue
	if !ready {
		s = corev1.ConditionFalse
	}
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: s}}}}
}

func installed() []runtime.Object {
	return []runtime.Object{
		testutil.Namespace(),
		testutil.DaemonSet("localhost/kubectl-ebpf/agent:v7", 0, 0, 0),
		readyNode("n1", true), readyNode("down", false),
	}
}

// cleanupPhase makes every cleanup pod finish with phase as soon as it is created.
func cleanupPhase(f *testutil.Fake, phase corev1.PodPhase) *[]*corev1.Pod {
	var created []*corev1.Pod
	f.Kube.PrependReactor("create", "pods", func(a clienttesting.Action) (bool, runtime.Object, error) {
		p := a.(clienttesting.CreateAction).GetObject().(*corev1.Pod)
		p.Status.Phase = phase
		created = append(created, p.DeepCopy())
		return false, nil, nil
	})
	return &created
}

func run(t *testing.T, f *testutil.Fake) (string, error) {
	t.Helper()
	var out bytes.Buffer
	o := &uninstall.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, Timeout: 5 * time.Second, Conn: kube.Conn{Clients: f.Clients}, PollInterval: 10 * time.Millisecond}
	err := testutil.RunOptions(t, o)
	return out.String(), err
}

func TestUninstallCleansEveryReadyNode(t *testing.T) {
	f := testutil.NewFake(t, installed())
	created := cleanupPhase(f, corev1.PodSucceeded)
	out, err := run(t, f)
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if len(*created) != 1 {
		t.Fatalf("%d cleanup pods, want 1 (the NotReady node is skipped)", len(*created))
	}
	p := (*created)[0]
	if p.Spec.NodeName != "n1" || p.Spec.RestartPolicy != corev1.RestartPolicyNever || !p.Spec.HostNetwork {
		t.Errorf("cleanup pod spec: node %q restart %q hostNetwork %v", p.Spec.NodeName, p.Spec.RestartPolicy, p.Spec.HostNetwork)
	}
	c := p.Spec.Containers[0]
	if c.Image != "localhost/kubectl-ebpf/agent:v7" || strings.Join(c.Args, " ") != "cleanup" || !*c.SecurityContext.Privileged {
		t.Errorf("cleanup container: image %s args %v", c.Image, c.Args)
	}
	for _, m := range c.VolumeMounts {
		if *m.MountPropagation != corev1.MountPropagationBidirectional {
			t.Errorf("mount %s propagation %s", m.MountPath, *m.MountPropagation)
		}
	}
	if p.Labels[manifests.LabelManagedBy] != manifests.LabelValue {
		t.Errorf("cleanup pod labels %v", p.Labels)
	}
	for _, want := range []string{
		"daemonset.apps/kebpf-agent deleted",
		"node down: not ready, skipping BPF cleanup",
		"node n1: fake logs",
		"node n1: clean",
		"namespace/kubectl-ebpf-system deleted",
		"kubectl-ebpf uninstalled",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if _, err := f.Kube.CoreV1().Namespaces().Get(context.Background(), manifests.Namespace, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("namespace still there: %v", err)
	}
	pods, _ := f.Kube.CoreV1().Pods(manifests.Namespace).List(context.Background(), metav1.ListOptions{})
	if len(pods.Items) != 0 {
		t.Errorf("%d pods left", len(pods.Items))
	}
}

func TestUninstallStopsWhenCleanupFails(t *testing.T) {
	f := testutil.NewFake(t, installed())
	cleanupPhase(f, corev1.PodFailed)
	out, err := run(t, f)
	want := "BPF cleanup failed on node n1: fake logs; objects left in place so uninstall can be retried"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %q\n%s", err, want, out)
	}
	if _, err := f.Kube.CoreV1().Namespaces().Get(context.Background(), manifests.Namespace, metav1.GetOptions{}); err != nil {
		t.Errorf("namespace deleted after a failed cleanup: %v", err)
	}
}

func TestUninstallNothingInstalled(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{readyNode("n1", true)})
	out, err := run(t, f)
	if err != nil || out != "nothing to uninstall\n" {
		t.Errorf("out %q err %v", out, err)
	}
	if m := f.Mutations(); len(m) > 0 {
		t.Errorf("changed the cluster: %v", m)
	}
}

// The cleanup pod takes kebpf-cni out of every pair of CNI dirs an install
// chained it into: the ones the DaemonSet mounts (a release before the
// record) and the ones its annotation records, whatever the current flags.
func TestUninstallUnchainsCNI(t *testing.T) {
	tests := []struct {
		name       string
		volumes    []corev1.Volume
		annotation string
		want       []manifests.CNIDirs
	}{
		{name: "dirs the DaemonSet mounts", volumes: []corev1.Volume{
			{Name: "cni-conf", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/etc/custom/net.d"}}},
			{Name: "cni-bin", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/usr/lib/cni"}}},
		}, want: []manifests.CNIDirs{{Conf: "/etc/custom/net.d", Bin: "/usr/lib/cni"}}},
		{name: "installed with --no-cni-chaining after installs that chained",
			annotation: `[{"conf":"/etc/cni/net.d","bin":"/opt/cni/bin"},{"conf":"/etc/custom/net.d","bin":"/usr/lib/cni"}]`,
			want:       []manifests.CNIDirs{{Conf: "/etc/cni/net.d", Bin: "/opt/cni/bin"}, {Conf: "/etc/custom/net.d", Bin: "/usr/lib/cni"}}},
		{name: "never chained", annotation: `[]`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs := installed()
			ds := objs[1].(*appsv1.DaemonSet)
			ds.Spec.Template.Spec.Volumes = tt.volumes
			if tt.annotation != "" {
				ds.Annotations = map[string]string{manifests.AnnotationCNIDirs: tt.annotation}
			}
			f := testutil.NewFake(t, objs)
			created := cleanupPhase(f, corev1.PodSucceeded)
			if out, err := run(t, f); err != nil {
				t.Fatalf("uninstall: %v\n%s", err, out)
			}
			if len(*created) != 1 {
				t.Fatalf("%d cleanup pods", len(*created))
			}
			p := (*created)[0]
			host := map[string]string{}
			for _, v := range p.Spec.Volumes {
				if v.HostPath != nil {
					host[v.Name] = v.HostPath.Path
				}
			}
			mounted := map[string]string{}
			for _, m := range p.Spec.Containers[0].VolumeMounts {
				mounted[m.Name] = m.MountPath
			}
			wantArgs := []string{"cleanup"}
			for i, d := range tt.want {
				m := manifests.CNIStaleMount(i)
				wantArgs = append(wantArgs, "--cni-unchain="+m.Conf+":"+m.Bin)
				conf, bin := fmt.Sprintf("cni-%d-conf", i), fmt.Sprintf("cni-%d-bin", i)
				if host[conf] != d.Conf || host[bin] != d.Bin || mounted[conf] != m.Conf || mounted[bin] != m.Bin {
					t.Errorf("pair %d: host %q %q mounted at %q %q, want %+v at %+v", i, host[conf], host[bin], mounted[conf], mounted[bin], d, m)
				}
			}
			if got := strings.Join(p.Spec.Containers[0].Args, " "); got != strings.Join(wantArgs, " ") {
				t.Errorf("cleanup args %q, want %q", got, strings.Join(wantArgs, " "))
			}
		})
	}
}

// The Envoy DaemonSet (l7 on) goes with the other labelled objects, after
// the node cleanup: until the cleanup detaches the steering the agents left
// pinned, selected connections still need their Envoy.
func TestUninstallRemovesEnvoyAfterCleanup(t *testing.T) {
	envoy, err := manifests.EnvoyDaemonSet(manifests.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f := testutil.NewFake(t, installed(), envoy)
	cleanupPhase(f, corev1.PodSucceeded)
	out, err := run(t, f)
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	clean := strings.Index(out, "node n1: clean\n")
	deleted := strings.Index(out, "daemonset.apps/kebpf-envoy deleted\n")
	if clean < 0 || deleted < clean {
		t.Errorf("want the Envoy DaemonSet deleted after the node cleanup:\n%s", out)
	}
	gvr := appsv1.SchemeGroupVersion.WithResource("daemonsets")
	if _, err := f.Dynamic.Resource(gvr).Namespace(manifests.Namespace).Get(context.Background(), manifests.EnvoyDaemonSetName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("Envoy DaemonSet still there: %v", err)
	}
}

// The NodeState admission policy and its binding are cluster-scoped: left
// behind alone (the namespace already gone), uninstall still finds and
// deletes them.
func TestUninstallRemovesLeftoverAdmissionPolicy(t *testing.T) {
	const name = "kubectl-ebpf-agent-own-nodestate"
	labels := manifests.CommonLabels()
	policy := func(kind string) *unstructured.Unstructured {
		u := &unstructured.Unstructured{}
		u.SetAPIVersion("admissionregistration.k8s.io/v1")
		u.SetKind(kind)
		u.SetName(name)
		u.SetLabels(labels)
		return u
	}
	f := testutil.NewFake(t, []runtime.Object{
		readyNode("n1", true),
		// What the token controller would add to the recreated namespace.
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: manifests.Namespace}},
		&admissionregistrationv1.ValidatingAdmissionPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}},
		&admissionregistrationv1.ValidatingAdmissionPolicyBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}},
	}, policy("ValidatingAdmissionPolicy"), policy("ValidatingAdmissionPolicyBinding"))
	cleanupPhase(f, corev1.PodSucceeded)
	out, err := run(t, f)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{
		"validatingadmissionpolicy.admissionregistration.k8s.io/" + name + " deleted",
		"validatingadmissionpolicybinding.admissionregistration.k8s.io/" + name + " deleted",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
