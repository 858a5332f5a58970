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
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clienttesting "k8s.io/client-go/testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/install"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func readyNode(name string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NodeStatus{
		NodeInfo:   corev1.NodeSystemInfo{KernelVersion: "6.18.0"},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
	}}
}

// checkPodsEnd makes every image-check pod created in f end as status
// says (the fake has no kubelet), and counts them.
func checkPodsEnd(f *testutil.Fake, status corev1.PodStatus) *int {
	n := new(int)
	f.Kube.PrependReactor("create", "pods", func(a clienttesting.Action) (bool, runtime.Object, error) {
		p := a.(clienttesting.CreateAction).GetObject().(*corev1.Pod)
		if p.Labels[manifests.LabelName] == install.ImageCheckName {
			p.Status = status
			*n++
		}
		return false, nil, nil
	})
	return n
}

var (
	nsGVR = schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}
	dsGVR = schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "daemonsets"}
)

func runInstall(t *testing.T, f *testutil.Fake, image string) (string, error) {
	t.Helper()
	f.RecordApplies()
	var out bytes.Buffer
	o := &install.Options{IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out}, DryRun: "none",
		Timeout: 5 * time.Second, PollInterval: 10 * time.Millisecond, Image: image, Conn: kube.Conn{Clients: f.Clients}}
	err := testutil.RunOptions(t, o)
	return out.String(), err
}

func checkPodsLeft(t *testing.T, f *testutil.Fake) {
	t.Helper()
	l, err := f.Kube.CoreV1().Pods(manifests.Namespace).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Items) > 0 {
		t.Errorf("%d image-check pods left behind", len(l.Items))
	}
}

// An image no node can pull stops a first install before the rollout,
// naming each node and the kubelet's reason, and leaves nothing behind.
func TestImageCheckStopsUnpullableImage(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{readyNode("n1"), readyNode("n2")})
	pods := checkPodsEnd(f, corev1.PodStatus{Phase: corev1.PodPending, ContainerStatuses: []corev1.ContainerStatus{{
		Name: "agent", State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
			Reason: "ErrImagePull", Message: "failed to pull and unpack image \"does-not-exist\":\n  not found"}},
	}}})
	out, err := runInstall(t, f, "does-not-exist")
	for _, want := range []string{"image check failed, nothing was changed",
		`node n1: Pending (agent: ErrImagePull): failed to pull and unpack image "does-not-exist": not found`, "node n2:", "--skip-image-check"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v\nwant it to contain %q", err, want)
		}
	}
	if *pods != 2 {
		t.Errorf("%d check pods, want one per ready node (2)", *pods)
	}
	if ds, _ := f.Dynamic.Resource(dsGVR).Namespace(manifests.Namespace).List(context.Background(), metav1.ListOptions{}); len(ds.Items) > 0 {
		t.Errorf("a DaemonSet was applied although the image check failed")
	}
	if ns, _ := f.Dynamic.Resource(nsGVR).List(context.Background(), metav1.ListOptions{}); len(ns.Items) > 0 {
		t.Errorf("the namespace created for the check is still there\n%s", out)
	}
	checkPodsLeft(t, f)
}

// A check command that fails (an image that pulls but is not our agent)
// stops the install too.
func TestImageCheckStopsImageThatDoesNotRun(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{readyNode("n1")})
	checkPodsEnd(f, corev1.PodStatus{Phase: corev1.PodFailed, ContainerStatuses: []corev1.ContainerStatus{{
		Name: "agent", Image: "busybox", State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 127, Reason: "Error"}},
	}}})
	_, err := runInstall(t, f, "busybox")
	if err == nil || !strings.Contains(err.Error(), "node n1: an image's check command failed: agent (busybox) exited 127 Error") {
		t.Errorf("err = %v, want the failed check command named", err)
	}
}

// Images every node runs go on: the rollout is applied after the check.
func TestImageCheckPassesThenRollsOut(t *testing.T) {
	f := testutil.NewFake(t, []runtime.Object{readyNode("n1")})
	pods := checkPodsEnd(f, corev1.PodStatus{Phase: corev1.PodSucceeded})
	out, err := runInstall(t, f, "registry.example/agent:v2")
	if err != nil {
		t.Fatal(err)
	}
	check, ds := strings.Index(out, "checking that registry.example/agent:v2 run(s) on 1 node(s)"), strings.Index(out, "daemonset.apps/kebpf-agent created")
	if *pods != 1 || check < 0 || ds < check {
		t.Errorf("want one check pod, then the DaemonSet applied; %d pods, output:\n%s", *pods, out)
	}
	checkPodsLeft(t, f)
}

// A re-install of the image the DaemonSet runs checks nothing: no pods.
func TestImageCheckSkipsRunningImage(t *testing.T) {
	image := "registry.example/agent:v1"
	f := testutil.NewFake(t, []runtime.Object{readyNode("n1"), testutil.DaemonSet(image, 1, 1, 1)})
	pods := checkPodsEnd(f, corev1.PodStatus{Phase: corev1.PodSucceeded})
	out, err := runInstall(t, f, image)
	if err != nil {
		t.Fatal(err)
	}
	if *pods != 0 || strings.Contains(out, "checking") {
		t.Errorf("checked an image the cluster runs: %d pods\n%s", *pods, out)
	}
}

// An install right after an uninstall without --wait waits for the old
// namespace to be gone instead of failing to create in it.
func TestInstallWaitsForTerminatingNamespace(t *testing.T) {
	ns := testutil.Namespace()
	ns.DeletionTimestamp = &metav1.Time{Time: time.Now()}
	f := testutil.NewFake(t, []runtime.Object{ns})
	go func() {
		time.Sleep(100 * time.Millisecond)
		_ = f.Kube.CoreV1().Namespaces().Delete(context.Background(), manifests.Namespace, metav1.DeleteOptions{})
	}()
	out, err := runInstall(t, f, "registry.example/agent:v1")
	if err != nil {
		t.Fatal(err)
	}
	wait, created := strings.Index(out, "waiting for namespace kubectl-ebpf-system, being deleted, to be gone"), strings.Index(out, "namespace/kubectl-ebpf-system created")
	if wait < 0 || created < wait {
		t.Errorf("want the wait, then the namespace created:\n%s", out)
	}
}
