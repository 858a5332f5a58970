// Package testutil holds what the plugin's tests share: the gate for
// integration tests, running the command tree in-process, and cluster cleanup.
package testutil

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/root"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Environment variables the integration tests read.
const (
	// EnvKubeconfig points the tests at a running cluster.
	EnvKubeconfig = "KEBPF_KUBECONFIG"
	// EnvE2E is set by `make e2e` and `make root`: the integration tiers
	// run, and what they need must be there.
	EnvE2E = "KEBPF_E2E"
	// EnvImage overrides the agent image the tests install (default manifests.DefaultImage()).
	EnvImage = "KEBPF_AGENT_IMAGE"
)

// Kubeconfig gates an integration test: it skips under -short, and where no
// cluster was asked for (plain `go test ./...` never brings one up), printing
// how to run it; under `make e2e` (KEBPF_E2E=1) a missing cluster fails, so
// a forgotten cluster never passes silently.
func Kubeconfig(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped with -short")
	}
	p := os.Getenv(EnvKubeconfig)
	switch {
	case p != "":
		return p
	case os.Getenv(EnvE2E) != "":
		t.Fatal("KEBPF_E2E is set but KEBPF_KUBECONFIG is not: run make e2e (brings up the local cluster)")
	default:
		t.Skip("integration test: needs a cluster; run make e2e (or set KEBPF_KUBECONFIG to a cluster's kubeconfig)")
	}
	return ""
}

// The in-process plugin under test stands for the build whose agent image
// the cluster has: its version is that image's tag, so every default the
// plugin derives from its version (install's image, uninstall's fallback
// cleanup image) names an image the nodes can run.
func init() {
	// A test binary carries no VCS stamp; the plugin under test stands for
	// a build that knows its version (install refuses one that does not,
	// which a test of that refusal sets up itself).
	if manifests.VersionSource == manifests.SourceNone {
		manifests.VersionSource = "test"
	}
	img := os.Getenv(EnvImage)
	if i := strings.LastIndex(img, ":"); i > 0 && !strings.Contains(img[i:], "/") && strings.HasPrefix(img, "localhost/kubectl-ebpf/agent:") {
		manifests.Version = img[i+1:]
	}
}

// Image is the agent image integration tests install.
func Image() string {
	if img := os.Getenv(EnvImage); img != "" {
		return img
	}
	return manifests.DefaultImage()
}

// Flags are kubeconfig flags for kubeconfig with a private discovery cache.
func Flags(t *testing.T, kubeconfig string) *genericclioptions.ConfigFlags {
	t.Helper()
	f := genericclioptions.NewConfigFlags(false)
	f.KubeConfig = &kubeconfig
	cache := t.TempDir()
	f.CacheDir = &cache
	return f
}

// Result is the outcome of one in-process command run.
type Result struct {
	Stdout, Stderr string
	Code           int
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.Code, r.Stdout, r.Stderr)
}

// Run runs `kubectl ebpf args...` in-process against flags.
func Run(t *testing.T, flags *genericclioptions.ConfigFlags, args ...string) Result {
	t.Helper()
	var out, errOut bytes.Buffer
	streams := genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	code := root.Execute(ctx, root.NewCmd(flags, streams), args, streams)
	r := Result{Stdout: out.String(), Stderr: errOut.String(), Code: code}
	t.Logf("kubectl ebpf %s: %s", strings.Join(args, " "), r)
	return r
}

// Clients builds API clients for kubeconfig.
func Clients(t *testing.T, kubeconfig string) *kube.Clients {
	t.Helper()
	c, err := kube.New(Flags(t, kubeconfig))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Lock serialises integration tests on one cluster across test binaries:
// `go test ./...` runs packages in parallel and they share the cluster.
func Lock(t *testing.T, kubeconfig string) {
	t.Helper()
	sum := sha256.Sum256([]byte(kubeconfig))
	path := filepath.Join(os.TempDir(), fmt.Sprintf("kebpf-integration-%x.lock", sum[:6]))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	})
}

// Cluster prepares an integration test: it gates on the kubeconfig, takes the
// cluster lock and makes sure kubectl-ebpf is uninstalled before and after.
func Cluster(t *testing.T) (kubeconfig string, flags *genericclioptions.ConfigFlags) {
	t.Helper()
	kubeconfig = Kubeconfig(t)
	Lock(t, kubeconfig)
	flags = Flags(t, kubeconfig)
	Uninstall(t, flags)
	t.Cleanup(func() { Uninstall(t, flags) })
	return kubeconfig, flags
}

// Uninstall removes kubectl-ebpf and waits until the namespace is gone.
func Uninstall(t *testing.T, flags *genericclioptions.ConfigFlags) {
	t.Helper()
	if r := Run(t, flags, "uninstall", "--timeout", "3m"); r.Code != 0 {
		t.Fatalf("uninstall: %s", r)
	}
	WaitNamespaceGone(t, *flags.KubeConfig)
}

// WaitNamespaceGone waits for our namespace to disappear. A bare API server
// (no controller-manager, so no namespace controller) never finishes the
// deletion; there the test finalizes the namespace itself, which is safe
// because uninstall already deleted everything in it.
func WaitNamespaceGone(t *testing.T, kubeconfig string) {
	t.Helper()
	c := Clients(t, kubeconfig)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	nsc := c.Kube.CoreV1().Namespaces()
	bare := !hasControllerManager(ctx, c)
	err := wait.PollUntilContextCancel(ctx, 500*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		ns, err := nsc.Get(ctx, manifests.Namespace, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		if bare && ns.DeletionTimestamp != nil && len(ns.Spec.Finalizers) > 0 {
			ns.Spec.Finalizers = nil
			if _, err := nsc.Finalize(ctx, ns, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return false, err
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("wait for namespace %s to be deleted: %v", manifests.Namespace, err)
	}
}

// hasControllerManager detects a controller-manager by a ConfigMap only it
// publishes into every namespace.
func hasControllerManager(ctx context.Context, c *kube.Clients) bool {
	_, err := c.Kube.CoreV1().ConfigMaps("kube-system").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
	return err == nil
}

// OneLine fails unless s is exactly one line starting with "error: ".
func OneLine(t *testing.T, s string) string {
	t.Helper()
	s = strings.TrimRight(s, "\n")
	if strings.Contains(s, "\n") || !strings.HasPrefix(s, "error: ") {
		t.Errorf("want one line `error: ...` on stderr, got %q", s)
	}
	return s
}
