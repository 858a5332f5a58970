package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

const removalNamespace = "kebpf-removal"

// TestIntegrationNamespaceDeleted: deleting the product's namespace without
// `kubectl ebpf uninstall` must not leave any node refusing new pods (the
// agents, told by the API that they are being removed, unchain kebpf-cni on
// exit), and a later uninstall still cleans every node's datapath although
// the namespace is gone.
func TestIntegrationNamespaceDeleted(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", removalNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	waitCNIChained(t, true, time.Minute)
	kubectlStdin(t, fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", removalNamespace), "apply", "-f", "-")

	start := time.Now()
	mustKubectl(t, time.Minute, "delete", "namespace", manifests.Namespace, "--wait=false")
	// The agents' own doing: kebpf-cni leaves every node as they exit.
	waitCNIChained(t, false, time.Minute)
	// New pods only once no agent is left to admit them: then a plugin
	// still chained would refuse every sandbox (fail closed, for good).
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		r := kubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.AgentSelector, "-o", "name")
		if strings.TrimSpace(r.stdout) == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent pods still there a minute after the namespace delete: %s", r.stdout)
		}
	}
	t.Logf("kebpf-cni unchained and agents gone %s after the namespace delete", time.Since(start).Round(100*time.Millisecond))
	var w strings.Builder
	for i, node := range env.Cluster.Nodes {
		w.WriteString(serverPod{name: fmt.Sprintf("after-%d", i), ns: removalNamespace, node: node,
			args: "serve, --tcp, '80', --udp, '', --http, '0'", labels: "app: after"}.yaml())
	}
	kubectlStdin(t, w.String(), "apply", "-f", "-")
	r := kubectl(t, 2*time.Minute, "-n", removalNamespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=60s")
	if r.code != 0 {
		desc := kubectl(t, time.Minute, "-n", removalNamespace, "describe", "pods")
		t.Fatalf("after deleting %s, new pods did not start within a minute on every node:\n%s\n%s", manifests.Namespace, r.stderr, desc.stdout)
	}
	t.Logf("new pods on every node Ready %s after the namespace delete", time.Since(start).Round(100*time.Millisecond))

	out := mustKubectl(t, 6*time.Minute, "ebpf", "uninstall", "--wait")
	if !strings.Contains(out, "recreated for the node cleanup") {
		t.Errorf("uninstall with the namespace gone did not clean the nodes:\n%s", out)
	}
	for _, node := range env.Cluster.Nodes {
		if s := inspectNode(t, node); s.pinDir || len(s.attached) > 0 {
			t.Errorf("node %s after uninstall: pin dir %v, attached %v", node, s.pinDir, s.attached)
		}
	}
}
