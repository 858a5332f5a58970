package uninstall_test

import (
	"context"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestIntegrationUninstallRemovesEveryLabelledObject(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("install: %s", r)
	}
	r := testutil.Run(t, flags, "uninstall", "--timeout", "3m")
	if r.Code != 0 {
		t.Fatalf("uninstall: %s", r)
	}
	if !strings.Contains(r.Stdout, "kubectl-ebpf uninstalled") {
		t.Errorf("uninstall output: %q", r.Stdout)
	}
	testutil.WaitNamespaceGone(t, kc)

	c := testutil.Clients(t, kc)
	objs, err := manifests.Objects(manifests.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, obj := range objs {
		ri, m, err := c.Resource(obj.GroupVersionKind(), obj.GetNamespace())
		if err != nil {
			t.Fatal(err)
		}
		l, err := ri.List(ctx, metav1.ListOptions{LabelSelector: manifests.ManagedSelector})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Fatalf("list %s: %v", m.Resource.Resource, err)
		}
		if err == nil {
			for _, item := range l.Items {
				t.Errorf("%s %s/%s left after uninstall", obj.GetKind(), item.GetNamespace(), item.GetName())
			}
		}
	}
	pods, err := c.Kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{LabelSelector: manifests.ManagedSelector})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		t.Errorf("pod %s/%s left after uninstall", p.Namespace, p.Name)
	}

	r = testutil.Run(t, flags, "uninstall")
	if r.Code != 0 || strings.TrimSpace(r.Stdout) != "nothing to uninstall" {
		t.Errorf("second uninstall: %s", r)
	}
}
