package install_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestIntegrationInstallDryRunServerAppliesNothing(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	r := testutil.Run(t, flags, "install", "--image", testutil.Image(), "--dry-run=server")
	if r.Code != 0 {
		t.Fatalf("install --dry-run=server: %s", r)
	}
	if !strings.Contains(r.Stdout, "(server dry run)") {
		t.Errorf("stdout does not mark the dry run: %q", r.Stdout)
	}
	for _, obj := range rendered(t) {
		if got := get(t, testutil.Clients(t, kc), obj); got != nil {
			t.Errorf("%s %s exists after a server dry run", obj.GetKind(), obj.GetName())
		}
	}
}

func TestIntegrationInstallTwiceIsNoop(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	c := testutil.Clients(t, kc)
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("first install: %s", r)
	}
	before := snapshot(t, c)
	r := testutil.Run(t, flags, "install", "--image", testutil.Image())
	if r.Code != 0 {
		t.Fatalf("second install: %s", r)
	}
	if !strings.Contains(r.Stdout, "nothing changed") {
		t.Errorf("second install does not say it changed nothing: %q", r.Stdout)
	}
	after := snapshot(t, c)
	for k, b := range before {
		a := after[k]
		// Controllers write status (DaemonSet, CRD, admission policy) and
		// bump resourceVersion; what install applies must be unchanged.
		if !kube.SameApply(b, a) {
			t.Errorf("%s changed on a second install: resourceVersion %s -> %s, generation %d -> %d", k, b.GetResourceVersion(), a.GetResourceVersion(), b.GetGeneration(), a.GetGeneration())
		}
	}

	// A different image is an upgrade of the DaemonSet only.
	const other = "localhost/kubectl-ebpf/agent:upgrade-test"
	// An image no node has, so the image check must refuse it and
	// change nothing; past the check it is an upgrade of the DaemonSet.
	if r := testutil.Run(t, flags, "install", "--image", other); r.Code == 0 || !strings.Contains(r.Stderr, "image check failed, nothing was changed") {
		t.Errorf("install of an image no node has: %s", r)
	}
	if after2 := snapshot(t, c); after2["DaemonSet/"+manifests.DaemonSetName].GetGeneration() != after["DaemonSet/"+manifests.DaemonSetName].GetGeneration() {
		t.Errorf("the refused install changed the DaemonSet")
	}
	r = testutil.Run(t, flags, "install", "--skip-image-check", "--image", other)
	if r.Code != 0 {
		t.Fatalf("upgrade: %s", r)
	}
	if !strings.Contains(r.Stdout, "daemonset.apps/kebpf-agent configured") || !strings.Contains(r.Stdout, "configmap/kubectl-ebpf-config unchanged") {
		t.Errorf("upgrade output: %q", r.Stdout)
	}
	ds, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(context.Background(), manifests.DaemonSetName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ctr := range append(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers...) {
		if ctr.Image != other {
			t.Errorf("container %s image %s after upgrade, want %s", ctr.Name, ctr.Image, other)
		}
	}
	// Back to the real image so uninstall's cleanup pods can run.
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("downgrade: %s", r)
	}
}

func TestIntegrationInstallWithoutPermissionsCreatesNothing(t *testing.T) {
	kc, _ := testutil.Cluster(t)
	flags := testutil.Flags(t, kc)
	nobody := "nobody"
	flags.Impersonate = &nobody
	r := testutil.Run(t, flags, "install", "--image", testutil.Image())
	if r.Code == 0 {
		t.Fatalf("install as nobody succeeded: %s", r)
	}
	line := testutil.OneLine(t, r.Stderr)
	if !strings.Contains(line, "missing permissions") || !strings.Contains(line, "create namespaces") {
		t.Errorf("error does not name the missing permission: %q", line)
	}
	for _, obj := range rendered(t) {
		if got := get(t, testutil.Clients(t, kc), obj); got != nil {
			t.Errorf("%s %s created despite failed preflight", obj.GetKind(), obj.GetName())
		}
	}
}

// Needs no cluster: nothing listens on port 1.
func TestUnreachableClusterIsOneLine(t *testing.T) {
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	const cfg = `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`
	if err := os.WriteFile(kc, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"install"}, {"status"}, {"uninstall"}, {"version"}} {
		t.Run(args[0], func(t *testing.T) {
			r := testutil.Run(t, testutil.Flags(t, kc), args...)
			if r.Code == 0 {
				t.Fatalf("succeeded against an unreachable cluster: %s", r)
			}
			line := testutil.OneLine(t, r.Stderr)
			if !strings.Contains(line, "cannot reach cluster at https://127.0.0.1:1") {
				t.Errorf("error does not name the server: %q", line)
			}
		})
	}
}

func rendered(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	objs, err := manifests.Objects(manifests.RenderOptions{Image: testutil.Image()})
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func get(t *testing.T, c *kube.Clients, obj *unstructured.Unstructured) *unstructured.Unstructured {
	t.Helper()
	ri, _, err := c.Resource(obj.GroupVersionKind(), obj.GetNamespace())
	if err != nil {
		t.Fatal(err)
	}
	got, err := ri.Get(context.Background(), obj.GetName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func snapshot(t *testing.T, c *kube.Clients) map[string]*unstructured.Unstructured {
	t.Helper()
	objs := map[string]*unstructured.Unstructured{}
	for _, obj := range rendered(t) {
		got := get(t, c, obj)
		if got == nil {
			t.Fatalf("%s %s not installed", obj.GetKind(), obj.GetName())
		}
		objs[obj.GetKind()+"/"+obj.GetName()] = got
	}
	return objs
}

// The agent must reach the API server without kube-proxy, so install points
// it at the address the kubernetes Service's EndpointSlice names.
func TestIntegrationInstallSetsAPIServerEnv(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	c := testutil.Clients(t, kc)
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("install: %s", r)
	}
	host, port, err := c.APIServerEndpoint(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ds, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(context.Background(), manifests.DaemonSetName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ctr := range append(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers...) {
		env := map[string]string{}
		for _, e := range ctr.Env {
			env[e.Name] = e.Value
		}
		if ctr.Name != manifests.AgentContainer {
			if _, ok := env["KUBERNETES_SERVICE_HOST"]; ok {
				t.Errorf("container %s gets KUBERNETES_SERVICE_HOST too", ctr.Name)
			}
			continue
		}
		if env["KUBERNETES_SERVICE_HOST"] != host || env["KUBERNETES_SERVICE_PORT"] != port {
			t.Errorf("agent env %s:%s, want %s:%s from the EndpointSlice", env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"], host, port)
		}
	}
}
