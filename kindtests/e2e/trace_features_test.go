package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// The trace of every feature but policy (TestIntegrationTrace has that):
// new pods held and admitted by the CNI, a ClusterIP connect translated by
// the socket LB and one refused for want of endpoints, and L7 requests
// Envoy allowed and denied, each named.

const tfNS = "kebpf-trace-features"

func tfWorkloads() string {
	// One node for both: the L7 rows need the client on the destination's
	// node, whose Envoy enforces (bpf/sockmap README, "Multi-node").
	pod := func(name, args string) string {
		return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %[1]s, namespace: %[2]s, labels: {app: %[1]s}}
spec:
  nodeName: %[5]s
  containers:
  - name: main
    image: %[3]s
    command: [/usr/local/bin/kebpf-testserver, serve, %[4]s, --name, %[1]s]
---
`, name, tfNS, env.Product.TestServerRef, args, nodeAt(0))
	}
	return fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n---\n", tfNS) +
		pod("web", `--http, "8080"`) + pod("client", `--tcp, "9"`) +
		fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: web, namespace: %[1]s}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: %[1]s}
spec:
  selector: {app: nothing}
  ports: [{name: http, port: 80, targetPort: 8080}]
`, tfNS)
}

// tfProbe runs one probe from the client pod and decodes its result.
func tfProbe(t *testing.T, args ...string) probeResult {
	t.Helper()
	r := kubectlQuiet(t, 2*time.Minute, append([]string{"-n", tfNS, "exec", "client", "--", "/usr/local/bin/kebpf-testserver", "probe", "--timeout", "2s"}, args...)...)
	res, err := decodeNProbes(r, 1)
	if err != nil {
		t.Fatalf("probe %v: %v", args, err)
	}
	return res[0]
}

// tfWait polls the trace (json) until want matches one event, or fails.
func tfWait(t *testing.T, what string, want func(apiv1.TraceEvent) bool, args ...string) apiv1.TraceEvent {
	t.Helper()
	var last []apiv1.TraceEvent
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		events, _ := traceEvents(t, args...)
		for _, e := range events {
			if want(e) {
				return e
			}
		}
		last = events
	}
	b, _ := json.MarshalIndent(last, "", " ")
	t.Fatalf("%s: no matching event in `kubectl ebpf trace %s`; got:\n%s", what, strings.Join(args, " "), b)
	return apiv1.TraceEvent{}
}

func TestIntegrationTraceFeatures(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", tfNS, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	mustKubectl(t, 3*time.Minute, "ebpf", "enable", "l7", "--wait")
	mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.EnvoyDaemonSetName, "--timeout=150s")
	waitEnvoyReady(t, 2*time.Minute)
	kubectlStdin(t, tfWorkloads(), "apply", "-f", "-")
	mustKubectl(t, 3*time.Minute, "-n", tfNS, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	webIP := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", tfNS, "get", "pod", "web", "-o", "jsonpath={.status.podIP}"))
	vip := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", tfNS, "get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"))
	emptyVIP := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", tfNS, "get", "svc", "empty", "-o", "jsonpath={.spec.clusterIP}"))

	t.Run("cni: each new pod held and admitted, named", func(t *testing.T) {
		for _, pod := range []string{"web", "client"} {
			e := tfWait(t, "cni "+pod, func(e apiv1.TraceEvent) bool {
				return e.Destination.Pod == pod && e.Destination.Namespace == tfNS
			}, "-n", tfNS, "--type", "cni", "--since", "10m")
			if e.Verdict != apiv1.TraceVerdictAdmitted || e.Message == "" {
				t.Errorf("cni event of %s = %+v, want admitted with how long it was held", pod, e)
			}
		}
	})

	t.Run("lb: a ClusterIP connect names the Service and the backend pod", func(t *testing.T) {
		if r := tfProbe(t, "--protocol", "http", "--to", vip+":80/"); !r.OK || r.Reply != "web" {
			t.Fatalf("client -> %s:80: %+v", vip, r)
		}
		e := tfWait(t, "translated", func(e apiv1.TraceEvent) bool {
			return e.Verdict == apiv1.TraceVerdictTranslated && e.Service != nil && e.Service.Name == "web"
		}, "-n", tfNS, "--type", "lb", "--from-pod", "client")
		if e.Service.Namespace != tfNS || e.Service.Port != "http" || e.Service.IP != vip || e.Service.PortNumber != 80 {
			t.Errorf("service = %+v, want %s/web port http %s:80", e.Service, tfNS, vip)
		}
		if e.Destination.Pod != "web" || e.Destination.IP != webIP || e.Destination.Port != 8080 {
			t.Errorf("destination = %+v, want web %s:8080", e.Destination, webIP)
		}
		if e.Source.Pod != "client" || e.Process == nil || e.Process.PID == 0 || e.Process.Command != "kebpf-testserve" {
			t.Errorf("source %+v process %+v, want pod client, the probe's pid and command (comm is 15 bytes)", e.Source, e.Process)
		}
		// --port matches the Service port the client dialed as well.
		tfWait(t, "--port 80", func(e apiv1.TraceEvent) bool { return e.Type == apiv1.TraceTypeLB }, "-n", tfNS, "--type", "lb", "--port", "80")
	})

	t.Run("lb: a Service without endpoints refuses, named", func(t *testing.T) {
		if r := tfProbe(t, "--protocol", "tcp", "--to", emptyVIP+":80"); r.OK {
			t.Fatalf("client -> %s:80 (no endpoints) connected: %+v", emptyVIP, r)
		}
		e := tfWait(t, "refused", func(e apiv1.TraceEvent) bool {
			return e.Verdict == apiv1.TraceVerdictRefused && e.Service != nil && e.Service.Name == "empty"
		}, "-n", tfNS, "--type", "lb", "--verdict", "refused")
		if e.Destination.IP != emptyVIP || e.Source.Pod != "client" || e.Reason == "" {
			t.Errorf("refused event = %+v, want the Service address, client, a reason", e)
		}
	})

	t.Run("l7: requests allowed and denied by Envoy name the L7Policy", func(t *testing.T) {
		kubectlStdin(t, fmt.Sprintf(`apiVersion: kubectl-ebpf.io/v1alpha1
kind: L7Policy
metadata: {name: web-public, namespace: %s}
spec:
  podSelector: {matchLabels: {app: web}}
  ports: [{port: 8080}]
  rules: [{methods: [GET], path: {prefix: /public}}]
`, tfNS), "apply", "-f", "-")
		mustKubectl(t, 2*time.Minute, "-n", tfNS, "wait", "--for=condition=Programmed", "l7policy/web-public", "--timeout=90s")
		target := webIP + ":8080"
		var denied probeResult
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
			if denied = tfProbe(t, "--protocol", "http", "--to", target+"/admin"); denied.Status == 403 {
				break
			}
		}
		if denied.Status != 403 {
			t.Fatalf("GET /admin = %+v, want Envoy's 403", denied)
		}
		if r := tfProbe(t, "--protocol", "http", "--to", target+"/public/x"); r.Status != 200 {
			t.Fatalf("GET /public/x = %+v, want 200", r)
		}
		for _, c := range []struct {
			path, verdict string
			status        int
		}{{"/admin", apiv1.TraceVerdictDenied, 403}, {"/public/x", apiv1.TraceVerdictAllowed, 200}} {
			e := tfWait(t, "l7 "+c.path, func(e apiv1.TraceEvent) bool {
				return e.HTTP != nil && e.HTTP.Path == c.path
			}, "-n", tfNS, "--type", "l7", "--to-pod", "web")
			if e.Verdict != c.verdict || e.HTTP.Status != c.status || e.HTTP.Method != "GET" ||
				e.Policy == nil || e.Policy.Kind != "L7Policy" || e.Policy.Namespace != tfNS || e.Policy.Name != "web-public" {
				t.Errorf("%s: event %+v http %+v policy %+v, want %s %d naming L7Policy %s/web-public", c.path, e, e.HTTP, e.Policy, c.verdict, c.status, tfNS)
			}
			if e.Source.Pod != "client" {
				t.Errorf("%s: source %+v, want pod client", c.path, e.Source)
			}
		}
		e := tfWait(t, "steered connect", func(e apiv1.TraceEvent) bool {
			return e.Verdict == apiv1.TraceVerdictRedirected && e.Destination.Pod == "web"
		}, "-n", tfNS, "--type", "l7", "--verdict", "redirected")
		if e.Source.Pod != "client" || e.Process == nil || e.Process.PID == 0 {
			t.Errorf("steered connect %+v process %+v, want the client pod and the probe's pid", e.Source, e.Process)
		}
	})
}
