package e2e

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// l7Namespace holds the L7 suite's workloads.
const l7Namespace = "kebpf-l7"

// The suite's destination: pod api answers HTTP on 8080 with its name;
// Service api maps port 80 to it.
const l7Port = 8080

// l7Workloads: the destination, two client pods (one a NetworkPolicy will
// deny) and a hostNetwork client standing for the node's own processes.
func l7Workloads() string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", l7Namespace)
	httpReady := fmt.Sprintf("    readinessProbe: {tcpSocket: {port: %d}, periodSeconds: 1}\n", l7Port)
	podEnv := "    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]\n"
	// The destination's node enforces (bpf/sockmap README, "Multi-node"):
	// the clients share its node, and "remote" on the other node shows what
	// a client there gets (fail closed, until inbound steering exists).
	b.WriteString(serverPod{name: "api", ns: l7Namespace, node: nodeAt(0), labels: "app: api",
		args: fmt.Sprintf("serve, --tcp, '', --udp, '', --http, '%d'", l7Port), container: podEnv + httpReady}.yaml())
	for c, node := range map[string]string{"client": nodeAt(0), "other": nodeAt(0), "remote": nodeAt(1)} {
		b.WriteString(serverPod{name: c, ns: l7Namespace, node: node, labels: "app: " + c,
			args: "serve, --tcp, '18082', --udp, '', --http, '0'", container: podEnv +
				"    readinessProbe: {tcpSocket: {port: 18082}, periodSeconds: 1}\n"}.yaml())
	}
	b.WriteString(serverPod{name: "hostclient", ns: l7Namespace, node: nodeAt(0), labels: "app: hostclient", hostNetwork: true,
		args: "serve, --tcp, '18083', --udp, '', --http, '0'", container: podEnv +
			"    readinessProbe: {tcpSocket: {port: 18083}, periodSeconds: 1}\n"}.yaml())
	fmt.Fprintf(&b, `---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: %s}
spec:
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: %d, protocol: TCP}
`, l7Namespace, l7Port)
	return b.String()
}

// l7Policy allows GET under prefix on the api pod's port; everything
// else to that pod:port gets Envoy's 403.
func l7Policy(prefix string) string {
	return fmt.Sprintf(`apiVersion: kubectl-ebpf.io/v1alpha1
kind: L7Policy
metadata: {name: api, namespace: %s}
spec:
  podSelector: {matchLabels: {app: api}}
  ports: [{port: %d}]
  rules:
  - methods: [GET]
    path: {prefix: %q}
`, l7Namespace, l7Port, prefix)
}

// httpFrom GETs every target (HOST:PORT/path) once, concurrently, from a
// pod of the suite, one result per target.
func httpFrom(t *testing.T, pod string, targets ...string) []probeResult {
	t.Helper()
	r := kubectlQuiet(t, 2*time.Minute, "-n", l7Namespace, "exec", pod, "--", "/usr/local/bin/kebpf-testserver", "probe",
		"--protocol", "http", "--to", strings.Join(targets, ","), "--timeout", "3s")
	out, err := decodeNProbes(r, len(targets))
	if err != nil {
		t.Fatalf("probe from %s: %v", pod, err)
	}
	return out
}

// verdict is what a request got, as the rows state it: "200 api",
// "403 RBAC: access denied", or the failure class ("refused", "timeout").
func verdict(r probeResult) string {
	if r.Status != 0 {
		return strconv.Itoa(r.Status) + " " + r.Reply
	}
	if r.OK {
		return "ok " + r.Reply
	}
	return r.Class
}

const (
	allowed = "200 api"
	denied  = "403 RBAC: access denied"
)

// l7Row is one request and the verdict it must get.
type l7Row struct {
	from, to, want string
}

// checkL7 runs rows (grouped by client, concurrently per client).
func checkL7(t *testing.T, rows []l7Row) {
	t.Helper()
	byFrom := map[string][]l7Row{}
	var order []string
	for _, r := range rows {
		if _, ok := byFrom[r.from]; !ok {
			order = append(order, r.from)
		}
		byFrom[r.from] = append(byFrom[r.from], r)
	}
	for _, from := range order {
		rs := byFrom[from]
		var targets []string
		for _, r := range rs {
			targets = append(targets, r.to)
		}
		for i, got := range httpFrom(t, from, targets...) {
			if v := verdict(got); v != rs[i].want {
				t.Errorf("%s -> %s: got %q, want %q (%+v)", from, rs[i].to, v, rs[i].want, got)
			}
		}
	}
}

// waitL7 retries rows until all pass (a change travels: API -> agent ->
// Envoy/maps), then checks them once more for the record.
func waitL7(t *testing.T, what string, timeout time.Duration, rows []l7Row) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok := true
		for _, r := range rows {
			if v := verdict(httpFrom(t, r.from, r.to)[0]); v != r.want {
				ok = false
				if time.Now().After(deadline) {
					t.Fatalf("%s: %s -> %s still %q after %s, want %q", what, r.from, r.to, v, timeout, r.want)
				}
				break
			}
		}
		if ok {
			return
		}
		time.Sleep(time.Second)
	}
}

// l7NodeStates reads every NodeState's l7 block.
func l7NodeStates(t *testing.T) map[string]map[string]any {
	t.Helper()
	var list struct {
		Items []struct {
			Metadata struct{ Name string } `json:"metadata"`
			Status   struct {
				L7 map[string]any `json:"l7"`
			} `json:"status"`
		} `json:"items"`
	}
	kubectlJSON(t, &list, "get", "nodestates", "-o", "json")
	out := map[string]map[string]any{}
	for _, it := range list.Items {
		out[it.Metadata.Name] = it.Status.L7
	}
	return out
}

// waitEnvoyReady waits until every node reports its Envoy ready.
func waitEnvoyReady(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		states := l7NodeStates(t)
		ready := len(states) == len(env.Cluster.Nodes)
		for _, st := range states {
			if st["envoyReady"] != true {
				ready = false
			}
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			kubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-o", "wide")
			kubectl(t, time.Minute, "-n", manifests.Namespace, "logs", "-l", "app.kubernetes.io/name="+manifests.EnvoyDaemonSetName, "--tail=50")
			t.Fatalf("Envoy not ready on every node after %s: %v", timeout, states)
		}
		time.Sleep(time.Second)
	}
}

// TestIntegrationL7 is issue 9's acceptance on the local cluster: an
// L7Policy answered 200/403 by the node's Envoy for pod IP and ClusterIP,
// NetworkPolicy still deciding, no way around Envoy, policy updates and
// deletion, l7 switched off and on, and the agent and Envoy restarted
// under a request loop.
func TestIntegrationL7(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", l7Namespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	kubectlStdin(t, l7Workloads(), "apply", "-f", "-")
	mustKubectl(t, 3*time.Minute, "-n", l7Namespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	top := readL7Topology(t)
	podAddr := fmt.Sprintf("%s:%d", top.podIP["api"], l7Port)
	svcAddr := top.clusterIP + ":80"
	mapped := fmt.Sprintf("[::ffff:%s]:%d", top.podIP["api"], l7Port)

	// Before l7: direct, everything answered by the pod.
	checkL7(t, []l7Row{{"client", podAddr + "/private", allowed}, {"client", svcAddr + "/private", allowed}, {"remote", podAddr + "/private", allowed}})

	mustKubectl(t, 3*time.Minute, "ebpf", "enable", "l7", "--wait")
	mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.EnvoyDaemonSetName, "--timeout=150s")
	waitEnvoyReady(t, 2*time.Minute)
	kubectlStdin(t, l7Policy("/public/"), "apply", "-f", "-")
	mustKubectl(t, 2*time.Minute, "-n", l7Namespace, "wait", "--for=condition=Programmed", "l7policy/api", "--timeout=90s")

	enforced := []l7Row{
		{"client", podAddr + "/public/index.html", allowed},
		{"client", podAddr + "/private", denied},
		{"client", svcAddr + "/public/x", allowed},
		{"client", svcAddr + "/private", denied},
		// No bypass: a dual-stack socket's v4-mapped address, and the
		// node's own processes (hostNetwork pod), meet Envoy too.
		{"client", mapped + "/private", denied},
		{"hostclient", podAddr + "/private", denied},
		{"hostclient", svcAddr + "/public/y", allowed},
		// A client on another node: its node does not steer (only the
		// destination's node has the pod's filter chains), and the
		// destination's node drops a SYN to a steered pod:port that does
		// not come from its Envoy (REASON_L7_BYPASS): fail closed, never
		// unfiltered.
		{"remote", podAddr + "/private", "timeout"},
		{"remote", podAddr + "/public/index.html", "timeout"},
	}
	t.Run("enforced", func(t *testing.T) {
		waitL7(t, "L7Policy enforced", 30*time.Second, enforced[:2])
		checkL7(t, enforced)
		// The remote rows' drops are named for what they are.
		if tr := kubectl(t, time.Minute, "ebpf", "trace", "-n", l7Namespace, "--to-pod", "api", "--verdict", "denied", "--since", "5m", "-o", "json"); !strings.Contains(tr.stdout, `"reason":"l7-bypass"`) {
			t.Errorf("no l7-bypass denial of the remote client in the trace (exit %d):\n%s%s", tr.code, tr.stdout, tr.stderr)
		}
		if s, r := status(t); r.code != 0 {
			t.Errorf("status with l7 on: exit %d: %+v", r.code, s)
		}
		// Enforcement proves Envoy ACKed; the NodeState shows the ACK at the
		// agent's next publish, a moment later: poll for it.
		var bad []string
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(500 * time.Millisecond) {
			bad = bad[:0]
			for node, st := range l7NodeStates(t) {
				if st["envoyReady"] != true || st["ackedVersion"] == "" || st["ackedVersion"] != st["version"] {
					bad = append(bad, fmt.Sprintf("node %s l7 status %v", node, st))
				}
			}
			if len(bad) == 0 || time.Now().After(deadline) {
				break
			}
		}
		for _, b := range bad {
			t.Errorf("%s: want Envoy ready on the served version", b)
		}
	})

	t.Run("access log names the policy", func(t *testing.T) {
		// Envoy flushes its stdout access log every second (the DaemonSet's
		// --file-flush-interval-msec): poll a little longer than that.
		var allowedLine, deniedLine bool
		var logs string
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline) && !(allowedLine && deniedLine); time.Sleep(500 * time.Millisecond) {
			logs = runKubectl(t, time.Minute, false, "-n", manifests.Namespace, "logs", "-l", "app.kubernetes.io/name="+manifests.EnvoyDaemonSetName, "--tail=500").stdout
			for _, line := range strings.Split(logs, "\n") {
				var e struct {
					Path         string `json:"path"`
					ResponseCode int    `json:"response_code"`
					L7Policies   string `json:"l7policies"`
					RBAC         struct {
						Policy string `json:"enforced_effective_policy_id"`
						Result string `json:"enforced_engine_result"`
					} `json:"rbac"`
				}
				if json.Unmarshal([]byte(strings.TrimSpace(line)), &e) != nil {
					continue
				}
				if e.Path == "/public/index.html" && e.ResponseCode == 200 && e.RBAC.Policy == l7Namespace+"/api/0" {
					allowedLine = true
				}
				if e.Path == "/private" && e.ResponseCode == 403 && e.RBAC.Result == "denied" && e.L7Policies == l7Namespace+"/api" {
					deniedLine = true
				}
			}
		}
		if !allowedLine || !deniedLine {
			t.Errorf("Envoy access log: allowed entry naming %s/api/0 %v, denied 403 entry naming %s/api %v\n%s",
				l7Namespace, allowedLine, l7Namespace, deniedLine, logs)
		}
	})

	t.Run("NetworkPolicy still decides", func(t *testing.T) {
		// Only client may reach api: other is denied at L3/L4 although an
		// L7Policy allows its request, by pod IP and by ClusterIP.
		kubectlStdin(t, fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-client, namespace: %s}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
`, l7Namespace), "apply", "-f", "-")
		rows := []l7Row{
			{"other", podAddr + "/public/x", "timeout"},
			{"other", svcAddr + "/public/x", "timeout"},
			{"client", podAddr + "/public/x", allowed},
			{"client", podAddr + "/private", denied},
		}
		waitL7(t, "NetworkPolicy deny", 30*time.Second, rows[:1])
		checkL7(t, rows)
		// An egress deny of the client wins likewise.
		kubectlStdin(t, fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-no-egress, namespace: %s}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
`, l7Namespace), "apply", "-f", "-")
		waitL7(t, "egress deny", 30*time.Second, []l7Row{{"client", podAddr + "/public/x", "timeout"}})
		mustKubectl(t, time.Minute, "-n", l7Namespace, "delete", "networkpolicy", "--all")
		waitL7(t, "policies gone", 30*time.Second, []l7Row{{"other", podAddr + "/public/x", allowed}})
	})

	t.Run("policy update and deletion", func(t *testing.T) {
		kubectlStdin(t, l7Policy("/v2/"), "apply", "-f", "-")
		waitL7(t, "updated policy", 30*time.Second, []l7Row{{"client", podAddr + "/public/x", denied}})
		checkL7(t, []l7Row{{"client", podAddr + "/v2/orders", allowed}, {"client", svcAddr + "/v2/orders", allowed}})
		mustKubectl(t, time.Minute, "-n", l7Namespace, "delete", "l7policy", "api")
		waitL7(t, "policy deleted: direct again", 30*time.Second, []l7Row{{"client", podAddr + "/private", allowed}})
		kubectlStdin(t, l7Policy("/public/"), "apply", "-f", "-")
		waitL7(t, "policy back", 30*time.Second, enforced[:2])
	})

	t.Run("invalid policy: refused with the reason, nothing else changes", func(t *testing.T) {
		// RE2 syntax is checked by the agent (the schema cannot): the
		// policy is stored, marked Accepted=False naming the field, and
		// never reaches Envoy; api keeps being enforced.
		bad := strings.Replace(l7Policy("/x/"), "name: api,", "name: bad,", 1)
		bad = strings.Replace(bad, `path: {prefix: "/x/"}`, `path: {regex: "([a-z"}`, 1)
		kubectlStdin(t, bad, "apply", "-f", "-")
		mustKubectl(t, time.Minute, "-n", l7Namespace, "wait", "--for=condition=Accepted=False", "l7policy/bad", "--timeout=30s")
		msg := mustKubectl(t, time.Minute, "-n", l7Namespace, "get", "l7policy", "bad", "-o",
			`jsonpath={.status.conditions[?(@.type=="Accepted")].message}`)
		if !strings.Contains(msg, "spec.rules[0].path.regex") {
			t.Errorf("Accepted message %q does not name spec.rules[0].path.regex", msg)
		}
		mustKubectl(t, time.Minute, "-n", l7Namespace, "wait", "--for=condition=Programmed", "l7policy/api", "--timeout=30s")
		checkL7(t, enforced[:2])
		mustKubectl(t, time.Minute, "-n", l7Namespace, "delete", "l7policy", "bad")
	})

	t.Run("agent restart under load: no failed request", func(t *testing.T) {
		loop := startLoop(t, "client", podAddr+"/public/loop", 150, 50*time.Millisecond)
		time.Sleep(time.Second)
		mustKubectl(t, 2*time.Minute, "-n", manifests.Namespace, "delete", "pod", "-l", manifests.AgentSelector, "--wait=true")
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.DaemonSetName, "--timeout=150s")
		res := loop.wait(t)
		failed := 0
		for _, r := range res {
			if verdict(r) != allowed {
				failed++
				t.Errorf("request during the agent restart: %q (%+v)", verdict(r), r)
			}
		}
		t.Logf("%d requests across the agent restart, %d failed", len(res), failed)
		checkL7(t, enforced[:2])
	})

	// The DaemonSet starts the replacement at once (maxSurge) and the
	// agent keeps steering while the deleted pod drains beside it, so
	// every request meets an Envoy: each one gets the 403, none fails.
	t.Run("Envoy pod deleted: no failed request, nothing gets through", func(t *testing.T) {
		old := strings.Fields(mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.EnvoySelector, "-o", "name"))
		const n, every = 600, 50 * time.Millisecond
		loop := startLoop(t, "client", podAddr+"/private", n, every)
		time.Sleep(time.Second)
		start := time.Now()
		mustKubectl(t, 2*time.Minute, "-n", manifests.Namespace, "delete", "pod", "-l", manifests.EnvoySelector, "--wait=false")
		mustKubectl(t, 2*time.Minute, append([]string{"-n", manifests.Namespace, "wait", "--for=delete", "--timeout=90s"}, old...)...)
		gone := time.Since(start)
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.EnvoyDaemonSetName, "--timeout=150s")
		waitL7(t, "enforced after Envoy restart", 60*time.Second, enforced[:2])
		back := time.Since(start)
		res := loop.wait(t)
		classes := map[string]int{}
		for _, r := range res {
			v := verdict(r)
			classes[v]++
			switch v {
			case denied:
			case allowed:
				t.Errorf("a denied path got through while Envoy restarted: %+v", r)
			default:
				t.Errorf("a request failed while Envoy restarted (want Envoy's 403): %q (%+v)", v, r)
			}
		}
		t.Logf("Envoy pod deleted: old pod gone after %s (preStop drain), replacement rolled out after %s; %d requests to a denied path meanwhile (one per %s): %v",
			gone.Round(100*time.Millisecond), back.Round(100*time.Millisecond), len(res), every, classes)
	})

	t.Run("disable l7: direct; enable: enforced again", func(t *testing.T) {
		mustKubectl(t, 3*time.Minute, "ebpf", "disable", "l7", "--wait")
		waitL7(t, "direct after disable", 30*time.Second, []l7Row{{"client", podAddr + "/private", allowed}, {"client", svcAddr + "/private", allowed}})
		for _, node := range env.Cluster.Nodes {
			for _, p := range inspectNode(t, node).programs {
				if strings.HasPrefix(p, "kebpf_l7") {
					t.Errorf("node %s: %s still loaded after disable l7", node, p)
				}
			}
		}
		mustKubectl(t, 3*time.Minute, "ebpf", "enable", "l7", "--wait")
		mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.EnvoyDaemonSetName, "--timeout=150s")
		waitEnvoyReady(t, 2*time.Minute)
		waitL7(t, "enforced after enable", 60*time.Second, enforced[:2])
		checkL7(t, enforced)
	})
}

// l7Topology is what the rows are computed from.
type l7Topology struct {
	clusterIP string
	podIP     map[string]string
}

func readL7Topology(t *testing.T) l7Topology {
	t.Helper()
	top := l7Topology{podIP: map[string]string{}}
	var pods struct {
		Items []struct {
			Metadata struct{ Name string } `json:"metadata"`
			Status   struct {
				PodIP string `json:"podIP"`
			} `json:"status"`
		} `json:"items"`
	}
	kubectlJSON(t, &pods, "-n", l7Namespace, "get", "pods", "-o", "json")
	for _, p := range pods.Items {
		top.podIP[p.Metadata.Name] = p.Status.PodIP
	}
	top.clusterIP = strings.TrimSpace(mustKubectl(t, time.Minute, "-n", l7Namespace, "get", "service", "api", "-o", "jsonpath={.spec.clusterIP}"))
	return top
}

// requestLoop is a background run of n requests from a pod.
type requestLoop struct {
	n    int
	done chan loopResult
}

type loopResult struct {
	res []probeResult
	err error
}

// startLoop sends n requests to target from pod, one every interval, each
// on a new connection.
func startLoop(t *testing.T, pod, target string, n int, interval time.Duration) *requestLoop {
	t.Helper()
	l := &requestLoop{n: n, done: make(chan loopResult, 1)}
	go func() {
		r := kubectlQuiet(t, 5*time.Minute, "-n", l7Namespace, "exec", pod, "--", "/usr/local/bin/kebpf-testserver", "probe",
			"--protocol", "http", "--to", target, "--count", strconv.Itoa(n), "--interval", interval.String(), "--timeout", "2s")
		res, err := decodeNProbes(r, n)
		l.done <- loopResult{res, err}
	}()
	return l
}

func (l *requestLoop) wait(t *testing.T) []probeResult {
	t.Helper()
	select {
	case lr := <-l.done:
		if lr.err != nil {
			t.Fatalf("request loop: %v", lr.err)
		}
		return lr.res
	case <-time.After(6 * time.Minute):
		t.Fatal("request loop never finished")
	}
	return nil
}
