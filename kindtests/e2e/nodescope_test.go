package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/uninstall"
)

const scopeNamespace = "kebpf-scope"

// clientLoop probes a ClusterIP from a pod over and over until stopped,
// counting every connection attempted and every one that failed.
type clientLoop struct {
	mu       sync.Mutex
	attempts int
	failures []string
	stop     chan struct{}
	done     chan struct{}
}

func startClientLoop(t *testing.T, pod, to string) *clientLoop {
	t.Helper()
	l := &clientLoop{stop: make(chan struct{}), done: make(chan struct{})}
	const batch = 10
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			r := runKubectl(t, time.Minute, false, "-n", scopeNamespace, "exec", pod, "--", "/usr/local/bin/kebpf-testserver", "probe",
				"--protocol", "tcp", "--to", to, "--count", strconv.Itoa(batch), "--timeout", "2s")
			res, err := decodeNProbes(r, batch)
			l.mu.Lock()
			if err != nil {
				// kubectl exec itself failed: not a datapath verdict, but
				// nothing may hide one either.
				l.failures = append(l.failures, "probe run: "+err.Error())
			}
			for _, p := range res {
				l.attempts++
				if !p.OK {
					l.failures = append(l.failures, fmt.Sprintf("%s at %s: %s (%s)", to, time.Now().Format("15:04:05.000"), p.Error, p.Class))
				}
			}
			l.mu.Unlock()
		}
	}()
	return l
}

// result stops the loop and reports attempts and failures so far.
func (l *clientLoop) result() (int, []string) {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.attempts, append([]string(nil), l.failures...)
}

// snapshot reports attempts and failures without stopping.
func (l *clientLoop) snapshot() (int, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.attempts, len(l.failures)
}

// TestIntegrationAgentScopedToNode proves that nodes sharing one kernel keep
// their datapaths apart: restarting one node's agent, then removing it and
// running uninstall's cleanup on that node only, leaves the other node's
// programs attached (the very same attachments) and its Service traffic
// flowing, measured with a client loop on the other node throughout.
// kube-proxy is off, so every connect of the loop needs our socket LB.
func TestIntegrationAgentScopedToNode(t *testing.T) {
	requireEnv(t)
	if len(env.Cluster.Nodes) < 2 {
		t.Fatalf("needs two nodes; cluster %s has %v (make e2e brings up two)", env.Name, env.Cluster.Nodes)
	}
	kp := kubeProxySwitch(t)
	a, b := nodeAt(0), nodeAt(1)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", scopeNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
		if err := kp.SetKubeProxy(context.Background(), env.Name, true); err != nil {
			t.Errorf("restore kube-proxy: %v", err)
		}
	})
	if err := kp.SetKubeProxy(context.Background(), env.Name, false); err != nil {
		t.Fatal(err)
	}
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")

	var w strings.Builder
	fmt.Fprintf(&w, "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", scopeNamespace)
	ready := "    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]\n    readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}\n"
	w.WriteString(serverPod{name: "web-a", ns: scopeNamespace, node: a, labels: "app: web", args: "serve, --tcp, '80', --udp, '', --http, '0'", container: ready}.yaml())
	w.WriteString(serverPod{name: "web-b", ns: scopeNamespace, node: b, labels: "app: web", args: "serve, --tcp, '80', --udp, '', --http, '0'", container: ready}.yaml())
	w.WriteString(serverPod{name: "client", ns: scopeNamespace, node: b, labels: "app: client", args: "serve, --tcp, '80', --udp, '', --http, '0'", container: ready}.yaml())
	fmt.Fprintf(&w, `---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: %s}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`, scopeNamespace)
	kubectlStdin(t, w.String(), "apply", "-f", "-")
	mustKubectl(t, 3*time.Minute, "-n", scopeNamespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	clusterIP := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", scopeNamespace, "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"))

	attachedOn := func(node string) []string {
		s := inspectNode(t, node)
		if !s.pinDir {
			t.Errorf("node %s: pin dir gone", node)
		}
		return s.attached
	}
	bBefore := attachedOn(b)
	if len(bBefore) == 0 || len(attachedOn(a)) == 0 {
		t.Fatalf("installed, but no kebpf_ programs attached at a node's cgroup root")
	}

	loop := startClientLoop(t, "client", clusterIP+":80")
	defer loop.result()
	waitAttempts := func(n int) {
		deadline := time.Now().Add(2 * time.Minute)
		for {
			if got, _ := loop.snapshot(); got >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("client loop made fewer than %d attempts in 2m", n)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	waitAttempts(20)

	t.Run("restart the agent of "+a, func(t *testing.T) {
		n0, _ := loop.snapshot()
		mustKubectl(t, 2*time.Minute, "-n", manifests.Namespace, "delete", "pod", "-l", manifests.LabelName+"=kebpf-agent", "--field-selector", "spec.nodeName="+a, "--wait=true")
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "ds/kebpf-agent", "--timeout=150s")
		waitAttempts(n0 + 20)
		if got := attachedOn(b); !slices.Equal(got, bBefore) {
			t.Errorf("node %s's attachments changed while %s's agent restarted:\nbefore %v\nafter  %v", b, a, bBefore, got)
		}
		if len(attachedOn(a)) == 0 {
			t.Errorf("node %s has nothing attached after its agent restarted", a)
		}
	})

	t.Run("uninstall from "+a+" only", func(t *testing.T) {
		// Keep the DaemonSet off node a (this rolls node b's agent too: one
		// more restart under the loop), then run what uninstall runs there.
		affinity := fmt.Sprintf(`{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":[%q]}]}]}}}}}}}`, a)
		mustKubectl(t, time.Minute, "-n", manifests.Namespace, "patch", "ds", "kebpf-agent", "--type", "merge", "-p", affinity)
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "ds/kebpf-agent", "--timeout=150s")
		deadline := time.Now().Add(2 * time.Minute)
		for {
			out := mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pod", "-l", manifests.LabelName+"=kebpf-agent", "--field-selector", "spec.nodeName="+a, "-o", "name")
			if strings.TrimSpace(out) == "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("agent pod on %s survives the affinity: %s", a, out)
			}
			time.Sleep(time.Second)
		}
		bKept := attachedOn(b)
		image := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "ds", "kebpf-agent", "-o", "jsonpath={.spec.template.spec.containers[0].image}"))
		pod := uninstall.CleanupPod(a, image, []manifests.CNIDirs{{Conf: manifests.DefaultCNIConfDir, Bin: manifests.DefaultCNIBinDir}})
		pod.Name = "cleanup-" + a
		pod.GenerateName = ""
		pod.APIVersion, pod.Kind = "v1", "Pod"
		podJSON, err := json.Marshal(pod)
		if err != nil {
			t.Fatal(err)
		}
		kubectlStdin(t, string(podJSON), "create", "-f", "-")
		deadline = time.Now().Add(3 * time.Minute)
		for {
			phase := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pod", pod.Name, "-o", "jsonpath={.status.phase}"))
			if phase == "Succeeded" {
				break
			}
			if phase == "Failed" || time.Now().After(deadline) {
				logs := kubectl(t, time.Minute, "-n", manifests.Namespace, "logs", pod.Name)
				t.Fatalf("cleanup on %s: phase %q; logs:\n%s%s", a, phase, logs.stdout, logs.stderr)
			}
			time.Sleep(time.Second)
		}
		t.Logf("cleanup on %s:\n%s", a, kubectl(t, time.Minute, "-n", manifests.Namespace, "logs", pod.Name).stdout)
		if s := inspectNode(t, a); s.pinDir || len(s.attached) > 0 {
			t.Errorf("node %s after its cleanup: pin dir %v, attached %v", a, s.pinDir, s.attached)
		}
		if got := attachedOn(b); !slices.Equal(got, bKept) {
			t.Errorf("node %s's attachments changed by %s's cleanup:\nbefore %v\nafter  %v", b, a, bKept, got)
		}
		n0, _ := loop.snapshot()
		waitAttempts(n0 + 20)
	})

	attempts, failures := loop.result()
	t.Logf("client loop on %s -> %s:80 (kube-proxy off): %d connections attempted, %d failed", b, clusterIP, attempts, len(failures))
	if len(failures) > 0 {
		t.Errorf("client loop on %s failed %d of %d connections:\n%s", b, len(failures), attempts, strings.Join(failures, "\n"))
	}
}
