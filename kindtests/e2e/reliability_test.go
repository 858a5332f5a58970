package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/images"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

const relNamespace = "kebpf-reliability"

// previousRelease is the commit the upgrade and downgrade scenarios start
// from: the last build of the product that passed CI before this suite.
// Bump it when a release changes what the agents keep across a restart.
const previousRelease = "26130adaabe06ddd3a71c6091bc676676be63d76"

// surgeRelease is the first build whose Envoy DaemonSet replaces a node's
// pod new pod first (maxSurge): a downgrade to it, as to any release from
// it on, must fail nothing. previousRelease replaces Envoy old pod first,
// which no later release can change for a downgrade to it.
const surgeRelease = "a103054e6b935f27e234a513da8899755cdf6d60"

// relStream is one never-ending probe a client pod runs: a protocol
// towards a Service that policy allows, or one it denies.
type relStream struct {
	container string // also the stream's name in the report
	proto     string
	service   string
	path      string // http: the request's path
	allowed   bool
	// firstNodeOnly: only the client on the first node runs it. The L7
	// server is there, and the destination's node enforces L7 (a client
	// on another node fails closed: bpf/sockmap README, "Multi-node").
	firstNodeOnly bool
}

var relStreams = []relStream{
	{container: "tcp-allowed", proto: "tcp", service: "rel-allowed", allowed: true},
	{container: "udp-allowed", proto: "udp", service: "rel-allowed", allowed: true},
	{container: "tcp-denied", proto: "tcp", service: "rel-denied"},
	{container: "udp-denied", proto: "udp", service: "rel-denied"},
	// Through the node's Envoy: the L7Policy allows GET /allowed..., and
	// Envoy answers anything else 403.
	{container: "http-allowed", proto: "http", service: "rel-web", path: "/allowed/x", allowed: true, firstNodeOnly: true},
	{container: "http-denied", proto: "http", service: "rel-web", path: "/denied", firstNodeOnly: true},
}

// relWebPort is the L7 server's port, the one its L7Policy names.
const relWebPort = 8080

// relWindow is one scenario's span of time; every probe that ended inside
// it counts for it.
type relWindow struct {
	name       string
	start, end time.Time
	note       string // what was measured besides the probes
	// envoyRestarted: the nodes' Envoy pods were replaced meanwhile (an
	// upgrade changes their bootstrap image).
	envoyRestarted bool
	// envoyStopFirst: they were replaced old pod first, the previous
	// release's DaemonSet strategy (no maxSurge): between the old Envoy's
	// exit and the new one's readiness a node has no Envoy and its
	// selected pod:ports fail closed (EPERM). This release replaces the
	// new pod first (manifests 50-envoy.yaml), which must fail nothing.
	envoyStopFirst bool
	// nodesNotReady: Kubernetes' node lifecycle controller declared nodes
	// NotReady meanwhile (NodeNotReady events), so their pods' endpoints
	// went unready: connections to a Service left without a ready
	// endpoint are then refused, by us as by kube-proxy.
	nodesNotReady []string
}

// relCount is what one scenario saw: allowed connections attempted and
// failed, denied connections attempted and let through; L4 (TCP, UDP)
// and L7 (HTTP through Envoy) apart.
type relCount struct {
	allowed, failed, denied, wronglyAllowed         int
	l7Allowed, l7Failed, l7Denied, l7WronglyAllowed int
	// refused: failed allowed connections (L4 and L7) refused at connect
	// (ECONNREFUSED: the socket LB's verdict for a Service without a
	// ready endpoint).
	refused                        int
	firstFailures, firstL7Failures []string
}

// TestIntegrationReliability runs client loops through ClusterIPs (TCP and
// UDP, a Service NetworkPolicy allows and one it denies, clients and
// backends on both nodes, kube-proxy off so every connect needs the socket
// LB; HTTP requests an L7Policy allows and denies, through the node's Envoy) while the agents are upgraded from the previous release, restarted
// every way an operator or the kernel does it, cut off from a stopped API
// server for two minutes, and downgraded. It prints, per scenario, the
// connections attempted, failed and wrongly allowed; the goal is zero
// failed and zero wrongly allowed at any moment.
func TestIntegrationReliability(t *testing.T) {
	requireEnv(t)
	if len(env.Cluster.Nodes) < 2 {
		t.Fatalf("needs two nodes; cluster %s has %v (make e2e brings up two)", env.Name, env.Cluster.Nodes)
	}
	p, err := env.ProviderOf()
	if err != nil {
		t.Fatal(err)
	}
	api, ok := p.(cluster.APIServerSwitch)
	if !ok {
		t.Fatalf("provider %s cannot stop and start the API server", p.Name())
	}
	kp := kubeProxySwitch(t)
	prev := releaseBuild(t, p, previousRelease)
	surge := releaseBuild(t, p, surgeRelease)
	t.Cleanup(func() {
		// Whatever failed, the API server must be back for the rest.
		if err := api.SetAPIServer(context.Background(), env.Name, true); err != nil {
			t.Errorf("start the API server again: %v", err)
		}
		kubectl(t, 2*time.Minute, "delete", "namespace", relNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
		if err := kp.SetKubeProxy(context.Background(), env.Name, true); err != nil {
			t.Errorf("restore kube-proxy: %v", err)
		}
	})
	ensureUninstalled(t)
	if err := kp.SetKubeProxy(context.Background(), env.Name, false); err != nil {
		t.Fatal(err)
	}
	installRelease := func(r images.Release) {
		t.Helper()
		runPlugin(t, r.Plugin, 6*time.Minute, "install", "--enable", "l7", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
		waitEnvoyPodsGone(t, 2*time.Minute)
	}
	installThis := func() {
		t.Helper()
		mustKubectl(t, 6*time.Minute, "ebpf", "install", "--enable", "l7", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
		// The replaced Envoy pods drain (15 s) past --wait: their end
		// belongs to this scenario.
		waitEnvoyPodsGone(t, 2*time.Minute)
	}
	installRelease(prev)
	deployReliabilityWorkload(t)

	a, b := nodeAt(0), nodeAt(1)
	var windows []relWindow
	run := func(name string, action func() string) {
		t.Helper()
		start := time.Now()
		t.Logf("scenario %q", name)
		envoy := envoyPods(t)
		note := action()
		// Probes in flight when the action ends count for it too.
		time.Sleep(5 * time.Second)
		after := envoyPods(t)
		restarted := envoy != "" && after != "" && after != envoy
		windows = append(windows, relWindow{name: name, start: start, end: time.Now(), note: note,
			envoyRestarted: restarted, envoyStopFirst: restarted && !envoySurges(t)})
	}
	time.Sleep(3 * time.Second) // the clients' first probes are under way
	run("steady, previous release "+prev.Version, func() string { time.Sleep(15 * time.Second); return "" })
	run("upgrade previous -> this release", func() string { installThis(); return "" })
	run("agent pod deleted (SIGTERM) on "+a, func() string {
		pod := agentPodOn(t, a)
		mustKubectl(t, 2*time.Minute, "-n", manifests.Namespace, "delete", "pod", pod.name, "--wait=true")
		waitAgentsReady(t)
		return ""
	})
	run("agent SIGKILL on "+b, func() string {
		pod := agentPodOn(t, b)
		killAgent(t, b, pod)
		waitAgentRestarted(t, b, pod)
		return ""
	})
	run("Envoy rollout restart, both nodes", func() string {
		mustKubectl(t, time.Minute, "-n", manifests.Namespace, "rollout", "restart", "daemonset/"+manifests.EnvoyDaemonSetName)
		mustKubectl(t, 5*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.EnvoyDaemonSetName, "--timeout=4m")
		// The old pods drain for 15 s after the new ones are ready.
		waitEnvoyPodsGone(t, 2*time.Minute)
		return ""
	})
	run("rollout restart, both nodes", func() string {
		mustKubectl(t, time.Minute, "-n", manifests.Namespace, "rollout", "restart", "daemonset/"+manifests.DaemonSetName)
		mustKubectl(t, 5*time.Minute, "-n", manifests.Namespace, "rollout", "status", "daemonset/"+manifests.DaemonSetName, "--timeout=4m")
		waitAgentsReady(t)
		return ""
	})
	outagePods := map[string]agentPod{}
	outageStart := time.Now()
	run("API server stopped 2 min", func() string {
		outageStart = time.Now()
		outagePods[a], outagePods[b] = agentPodOn(t, a), agentPodOn(t, b)
		cpu0 := map[string]float64{}
		for n, pod := range outagePods {
			cpu0[n] = agentCPUSeconds(t, n, pod)
		}
		if err := api.SetAPIServer(context.Background(), env.Name, false); err != nil {
			t.Fatalf("stop the API server: %v", err)
		}
		const outage = 2 * time.Minute
		time.Sleep(outage)
		var notes []string
		for n, pod := range outagePods {
			used := agentCPUSeconds(t, n, pod) - cpu0[n]
			notes = append(notes, fmt.Sprintf("agent on %s used %.2fs CPU in the %s outage", n, used, outage))
			// A retry loop without backoff burns a core; the agent's idle
			// watch retries cost well under a second.
			if used > outage.Seconds()/4 {
				t.Errorf("agent on %s spins while the API server is down: %.1fs CPU in %s", n, used, outage)
			}
		}
		return strings.Join(notes, "; ")
	})
	run("API server back, a Service created at once", func() string {
		if err := api.SetAPIServer(context.Background(), env.Name, true); err != nil {
			t.Fatalf("start the API server again: %v", err)
		}
		back := time.Now()
		// A change made the moment the API is back applies within seconds:
		// a Service whose EndpointSlice the test writes itself, so only the
		// agents stand between the change and the datapath (the
		// controller-manager's own informers back off for up to a minute
		// after an outage: a selector's slice would come that late).
		ip := manualService(t, "rel-late")
		reached := waitReachable(t, "client-0", relStreams[0].container, ip+":80", 2*time.Minute)
		for n, pod := range outagePods {
			if now := agentPodOn(t, n); now.restarts != pod.restarts {
				t.Errorf("agent on %s restarted during the outage (%d -> %d restarts)", n, pod.restarts, now.restarts)
			}
		}
		waitAgentsReady(t)
		// Let the node lifecycle controller's verdicts of the return
		// (below) show up in the events before they are read.
		time.Sleep(5 * time.Second)
		return fmt.Sprintf("the Service created when the API returned was reachable %s later", reached.Sub(back).Round(100*time.Millisecond))
	})
	windows[len(windows)-1].nodesNotReady = nodeNotReadyEvents(t, outageStart)
	run("agent on "+a+" cut off from the API 30 s, a Service created meanwhile", func() string {
		host, port := apiServerAddress(t)
		// The node's own traffic to the API server: its agent's (and its
		// kubelet's) connections go silent, as in a network partition.
		rule := []string{"OUTPUT", "-d", host, "-p", "tcp", "--dport", port, "-j", "DROP"}
		if out, err := onNode(t, a, append([]string{"iptables", "-w", "-I"}, rule...)...); err != nil {
			t.Fatalf("cut %s off: %v %s", a, err, out)
		}
		healed := false
		heal := func() {
			if !healed {
				if out, err := onNode(t, a, append([]string{"iptables", "-w", "-D"}, rule...)...); err != nil {
					t.Errorf("heal %s: %v %s", a, err, out)
				}
				healed = true
			}
		}
		t.Cleanup(heal)
		// Shorter than the node monitor's grace period (40 s): the node
		// stays Ready, so its pods stay endpoints (past it, Kubernetes
		// itself takes them out of every Service).
		time.Sleep(10 * time.Second)
		ip := manualService(t, "rel-cutoff")
		time.Sleep(20 * time.Second)
		heal()
		back := time.Now()
		reached := waitReachable(t, "client-0", relStreams[0].container, ip+":80", 3*time.Minute)
		waitAgentsReady(t)
		return fmt.Sprintf("the Service created while %s was cut off was reachable from its client %s after the partition healed",
			a, reached.Sub(back).Round(100*time.Millisecond))
	})
	run("downgrade this -> previous release", func() string { installRelease(prev); return "" })
	run("upgrade previous -> this release, again", func() string { installThis(); return "" })
	run("downgrade this -> "+surge.Version+" (Envoy surge)", func() string { installRelease(surge); return "" })

	counts := collectReliability(t, windows)
	var report strings.Builder
	fmt.Fprintf(&report, "%-44s | %-36s | %-36s\n", "", "TCP+UDP via ClusterIP (both nodes)", "HTTP via Envoy (L7Policy)")
	fmt.Fprintf(&report, "%-44s | %8s %7s %7s %11s | %8s %7s %7s %11s\n", "scenario", "allowed", "failed", "denied", "wrongly-ok", "allowed", "failed", "denied", "wrongly-ok")
	for i, w := range windows {
		c := counts[i]
		fmt.Fprintf(&report, "%-44s | %8d %7d %7d %11d | %8d %7d %7d %11d  (%s)\n", w.name, c.allowed, c.failed, c.denied, c.wronglyAllowed,
			c.l7Allowed, c.l7Failed, c.l7Denied, c.l7WronglyAllowed, w.end.Sub(w.start).Round(time.Second))
		switch {
		case w.envoyStopFirst:
			fmt.Fprintf(&report, "    Envoy pods replaced old pod first (the previous release's DaemonSet has no maxSurge): L7 connections fail closed (EPERM) until the new Envoy is ready\n")
		case w.envoyRestarted:
			fmt.Fprintf(&report, "    Envoy pods replaced new pod first (maxSurge): the new Envoy listens beside the draining one\n")
		}
		if len(w.nodesNotReady) > 0 {
			fmt.Fprintf(&report, "    Kubernetes declared %s NotReady (NodeNotReady events): their pods' endpoints went unready; %d connections refused for want of a ready endpoint, as kube-proxy would\n",
				strings.Join(w.nodesNotReady, ", "), c.refused)
		}
		if w.note != "" {
			fmt.Fprintf(&report, "    %s\n", w.note)
		}
	}
	title := fmt.Sprintf("reliability (TCP+UDP through ClusterIPs, clients on %s and %s, HTTP through %s's Envoy, kube-proxy off):\n", a, b, a)
	t.Logf("%s%s", title, report.String())
	// go test shows a passing test's log only with -v: make e2e prints this.
	if path := os.Getenv("KEBPF_RELIABILITY_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte("== "+title+report.String()), 0o644); err != nil {
			t.Errorf("write the report: %v", err)
		}
	}
	for i, w := range windows {
		c := counts[i]
		if c.allowed == 0 || c.denied == 0 || c.l7Allowed == 0 || c.l7Denied == 0 {
			t.Errorf("%s: no probes counted (allowed %d, denied %d, L7 %d, %d): the clients stopped", w.name, c.allowed, c.denied, c.l7Allowed, c.l7Denied)
		}
		// Refusals Kubernetes ordered (it declared the nodes NotReady, so
		// their endpoints unready) are the datapath obeying, not failing;
		// any other failure, or one without that verdict, counts.
		obeyed := 0
		if len(w.nodesNotReady) > 0 {
			obeyed = c.refused
		}
		// L7 requests may fail only while the previous release's DaemonSet
		// replaces Envoy old pod first (it has no other way).
		if c.failed+c.l7Failed > obeyed && !w.envoyStopFirst || c.failed > obeyed || c.wronglyAllowed > 0 {
			t.Errorf("%s: %d allowed connections (L4+L7) failed (%d refused with nodes %v declared NotReady), %d denied ones let through; first: %s",
				w.name, c.failed+c.l7Failed, c.refused, w.nodesNotReady, c.wronglyAllowed, strings.Join(append(c.firstFailures, c.firstL7Failures...), "; "))
		}
		// Nothing ever gets past Envoy, even while it is replaced.
		if c.l7WronglyAllowed > 0 {
			t.Errorf("%s: L7: %d allowed requests failed, %d denied ones let through (Envoy replaced: %v, old pod first: %v); first: %s", w.name, c.l7Failed,
				c.l7WronglyAllowed, w.envoyRestarted, w.envoyStopFirst, strings.Join(c.firstL7Failures, "; "))
		}
	}
}

// manualService creates a Service without a selector and its EndpointSlice
// (the rel-allowed pods on port 80), written by the test rather than the
// endpointslice controller, and returns its ClusterIP.
func manualService(t *testing.T, name string) string {
	t.Helper()
	ips := strings.Fields(mustKubectl(t, time.Minute, "-n", relNamespace, "get", "pods", "-l", "app=rel-allowed",
		"-o", "jsonpath={.items[*].status.podIP}"))
	var eps strings.Builder
	for _, ip := range ips {
		fmt.Fprintf(&eps, "- {addresses: [%s], conditions: {ready: true}}\n", ip)
	}
	kubectlStdin(t, fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %[1]s, namespace: %[2]s}
spec: {ports: [{name: tcp, port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: %[1]s-manual
  namespace: %[2]s
  labels: {kubernetes.io/service-name: %[1]s, endpointslice.kubernetes.io/managed-by: kebpf-e2e}
addressType: IPv4
ports: [{name: tcp, port: 80, protocol: TCP}]
endpoints:
%[3]s`, name, relNamespace, eps.String()), "apply", "-f", "-")
	return mustKubectl(t, time.Minute, "-n", relNamespace, "get", "service", name, "-o", "jsonpath={.spec.clusterIP}")
}

// nodeNotReadyEvents lists the nodes the node lifecycle controller declared
// NotReady (event reason NodeNotReady) since since.
func nodeNotReadyEvents(t *testing.T, since time.Time) []string {
	t.Helper()
	var l struct {
		Items []struct {
			InvolvedObject struct {
				Kind string `json:"kind"`
				Name string `json:"name"`
			} `json:"involvedObject"`
			LastTimestamp time.Time `json:"lastTimestamp"`
			EventTime     time.Time `json:"eventTime"`
		} `json:"items"`
	}
	kubectlJSON(t, &l, "get", "events", "-A", "--field-selector", "reason=NodeNotReady", "-o", "json")
	seen := map[string]bool{}
	var out []string
	for _, e := range l.Items {
		at := e.LastTimestamp
		if at.IsZero() {
			at = e.EventTime
		}
		// The controller records NodeNotReady on the node and on each of
		// its pods; the nodes are what the report names.
		if e.InvolvedObject.Kind == "Node" && !at.Before(since.Add(-time.Second)) && !seen[e.InvolvedObject.Name] {
			seen[e.InvolvedObject.Name] = true
			out = append(out, e.InvolvedObject.Name)
		}
	}
	slices.Sort(out)
	return out
}

// envoyPods names the Envoy pods by UID: it changes when one is replaced;
// "" while the API server is down (nothing can replace them then).
func envoyPods(t *testing.T) string {
	t.Helper()
	r := kubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.EnvoySelector,
		"-o", "jsonpath={.items[*].metadata.uid}")
	if r.code != 0 {
		return ""
	}
	return r.stdout
}

// envoySurges reports whether the Envoy DaemonSet replaces a node's pod
// new pod first (maxSurge above zero), as this release's manifest says.
func envoySurges(t *testing.T) bool {
	t.Helper()
	surge := strings.TrimSpace(mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "daemonset", manifests.EnvoyDaemonSetName,
		"-o", "jsonpath={.spec.updateStrategy.rollingUpdate.maxSurge}"))
	return surge != "" && surge != "0" && surge != "0%"
}

// waitEnvoyPodsGone waits until only one Envoy pod per node is left (the
// replaced ones finished draining).
func waitEnvoyPodsGone(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		pods := strings.Fields(envoyPods(t))
		if len(pods) == len(env.Cluster.Nodes) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d Envoy pods after %s, want one per node (%d)", len(pods), timeout, len(env.Cluster.Nodes))
		}
		time.Sleep(time.Second)
	}
}

// apiServerAddress is the host and port of the API server the agents
// reach (install points them at its real endpoint, not the ClusterIP).
func apiServerAddress(t *testing.T) (host, port string) {
	t.Helper()
	u := mustKubectl(t, time.Minute, "get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes",
		"-o", "jsonpath={.items[0].endpoints[0].addresses[0]} {.items[0].ports[0].port}")
	host, port, ok := strings.Cut(strings.TrimSpace(u), " ")
	if !ok || host == "" || port == "" {
		t.Fatalf("API server endpoint: %q", u)
	}
	return host, port
}

// releaseBuild builds an earlier release's plugin and agent image from
// this repository's history and loads the image into the cluster.
func releaseBuild(t *testing.T, p cluster.Provider, commit string) images.Release {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	root, err := images.ModuleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r, err := images.BuildRelease(ctx, root, commit, cluster.CacheDir())
	if err != nil {
		t.Fatalf("build release %s: %v", commit, err)
	}
	if err := p.LoadImages(ctx, env.Name, []string{r.AgentTar}); err != nil {
		t.Fatalf("load %s: %v", r.AgentRef, err)
	}
	t.Logf("release %s: plugin and %s built and loaded in %s", r.Version, r.AgentRef, time.Since(start).Round(100*time.Millisecond))
	return r
}

// runPlugin runs a kubectl-ebpf binary (another build than the one on
// PATH) against the cluster; it must succeed.
func runPlugin(t *testing.T, bin string, timeout time.Duration, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(args, "--kubeconfig", env.Cluster.Kubeconfig)...)
	out, err := cmd.CombinedOutput()
	t.Logf("$ %s %s\n%s", filepath.Base(filepath.Dir(bin))[:12]+"/kubectl-ebpf", strings.Join(args, " "), out)
	if err != nil {
		t.Fatalf("%s %s: %v", bin, strings.Join(args, " "), err)
	}
	return string(out)
}

// deployReliabilityWorkload starts, on both nodes, a backend of each
// Service and a client pod running every stream of relStreams for as long
// as the test runs; policy allows the clients into rel-allowed only.
func deployReliabilityWorkload(t *testing.T) {
	t.Helper()
	var w strings.Builder
	fmt.Fprintf(&w, "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", relNamespace)
	for _, svc := range []string{"rel-allowed", "rel-denied"} {
		for i := range 2 {
			w.WriteString(serverPod{name: fmt.Sprintf("%s-%d", svc, i), ns: relNamespace, node: nodeAt(i),
				args: "serve, --tcp, '80', --udp, '80', --http, '0'", labels: "app: " + svc}.yaml())
		}
		fmt.Fprintf(&w, "---\napiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: %s}\n"+
			"spec: {selector: {app: %s}, ports: [{name: tcp, port: 80, protocol: TCP}, {name: udp, port: 80, protocol: UDP}]}\n", svc, relNamespace, svc)
	}
	w.WriteString(serverPod{name: "rel-web-0", ns: relNamespace, node: nodeAt(0), labels: "app: rel-web",
		args:      fmt.Sprintf("serve, --tcp, '', --udp, '', --http, '%d'", relWebPort),
		container: fmt.Sprintf("    readinessProbe: {tcpSocket: {port: %d}, periodSeconds: 1}\n", relWebPort)}.yaml())
	fmt.Fprintf(&w, `---
apiVersion: v1
kind: Service
metadata: {name: rel-web, namespace: %[1]s}
spec: {selector: {app: rel-web}, ports: [{name: http, port: 80, targetPort: %[2]d, protocol: TCP}]}
---
apiVersion: kubectl-ebpf.io/v1alpha1
kind: L7Policy
metadata: {name: rel-web, namespace: %[1]s}
spec:
  podSelector: {matchLabels: {app: rel-web}}
  ports: [{port: %[2]d}]
  rules:
  - methods: [GET]
    path: {prefix: /allowed}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-to-web, namespace: %[1]s}
spec:
  podSelector: {matchLabels: {app: rel-web}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]
`, relNamespace, relWebPort)
	fmt.Fprintf(&w, `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: %[1]s}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-to-allowed, namespace: %[1]s}
spec:
  podSelector: {matchLabels: {app: rel-allowed}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]
`, relNamespace)
	kubectlStdin(t, w.String(), "apply", "-f", "-")
	mustKubectl(t, 2*time.Minute, "-n", relNamespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=90s")
	ips := map[string]string{}
	for _, svc := range []string{"rel-allowed", "rel-denied", "rel-web"} {
		ips[svc] = mustKubectl(t, time.Minute, "-n", relNamespace, "get", "service", svc, "-o", "jsonpath={.spec.clusterIP}")
	}
	w.Reset()
	for i := range 2 {
		fmt.Fprintf(&w, "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client-%d, namespace: %s, labels: {role: client}}\n"+
			"spec:\n  nodeName: %s\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n", i, relNamespace, nodeAt(i))
		for _, s := range relStreams {
			if s.firstNodeOnly && i > 0 {
				continue
			}
			// Denied probes each wait out their timeout; allowed ones answer
			// in well under a millisecond, so they run 10 a second. 2 s: an
			// allowed answer slower than that on two busy vCPUs is lost.
			fmt.Fprintf(&w, "  - name: %s\n    image: %s\n    imagePullPolicy: IfNotPresent\n    command: [/usr/local/bin/kebpf-testserver]\n"+
				"    args: [probe, --protocol, %s, --to, '%s:80%s', --count, '100000000', --interval, 100ms, --timeout, 2s]\n",
				s.container, env.Product.TestServerRef, s.proto, ips[s.service], s.path)
		}
	}
	// The clients start only once the policy is programmed for the
	// servers: a first denied probe let through before that is no
	// reliability failure. waitReachable/waitDenied prove it from a probe pod.
	waitPolicyInForce(t, ips)
	kubectlStdin(t, w.String(), "apply", "-f", "-")
	mustKubectl(t, 2*time.Minute, "-n", relNamespace, "wait", "--for=condition=Ready", "pod/client-0", "pod/client-1", "--timeout=90s")
}

// waitPolicyInForce waits until a probe pod labelled as a client reaches
// rel-allowed and not rel-denied, on both nodes' backends.
func waitPolicyInForce(t *testing.T, ips map[string]string) {
	t.Helper()
	kubectlStdin(t, serverPod{name: "client-check", ns: relNamespace, node: nodeAt(0), labels: "role: client",
		args: "serve, --tcp, '80', --udp, '', --http, '0'"}.yaml(), "apply", "-f", "-")
	mustKubectl(t, 2*time.Minute, "-n", relNamespace, "wait", "--for=condition=Ready", "pod", "client-check", "--timeout=90s")
	waitReachable(t, "client-check", "main", ips["rel-allowed"]+":80", 2*time.Minute)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		r := runKubectl(t, time.Minute, false, "-n", relNamespace, "exec", "client-check", "--", "/usr/local/bin/kebpf-testserver", "probe",
			"--protocol", "tcp", "--to", ips["rel-denied"]+":80", "--count", "4", "--timeout", "1s")
		res, err := decodeNProbes(r, 4)
		allDenied := err == nil
		for _, p := range res {
			allDenied = allDenied && !p.OK
		}
		if allDenied {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rel-denied still reachable from a client 2 minutes after its policy: %v %v", res, err)
		}
		time.Sleep(time.Second)
	}
	// The L7Policy: Envoy has it once /denied gets its 403.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		r := runKubectl(t, time.Minute, false, "-n", relNamespace, "exec", "client-check", "--", "/usr/local/bin/kebpf-testserver", "probe",
			"--protocol", "http", "--to", ips["rel-web"]+":80/allowed/x,"+ips["rel-web"]+":80/denied", "--timeout", "1s")
		res, err := decodeNProbes(r, 2)
		if err == nil && res[0].OK && res[1].Status == 403 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("L7Policy not enforced 2 minutes after it was created: %+v %v", res, err)
		}
	}
	mustKubectl(t, time.Minute, "-n", relNamespace, "delete", "pod", "client-check", "--wait=true")
}

// waitReachable probes to from a container of pod until a TCP connect
// succeeds and returns when it did.
func waitReachable(t *testing.T, pod, container, to string, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r := runKubectl(t, time.Minute, false, "-n", relNamespace, "exec", pod, "-c", container, "--", "/usr/local/bin/kebpf-testserver", "probe",
			"--protocol", "tcp", "--to", to, "--count", "1", "--timeout", "1s")
		if res, err := decodeNProbes(r, 1); err == nil && res[0].OK {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not reachable from %s within %s: %s", to, pod, timeout, r.stdout+r.stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// agentPod is the agent pod on a node, as the API shows it.
type agentPod struct {
	name, containerID string
	restarts          int
}

func agentPodOn(t *testing.T, node string) agentPod {
	t.Helper()
	var l struct {
		Items []struct {
			Metadata struct {
				Name              string `json:"name"`
				DeletionTimestamp string `json:"deletionTimestamp"`
			} `json:"metadata"`
			Status struct {
				ContainerStatuses []struct {
					Name         string `json:"name"`
					ContainerID  string `json:"containerID"`
					RestartCount int    `json:"restartCount"`
				} `json:"containerStatuses"`
			} `json:"status"`
		} `json:"items"`
	}
	kubectlJSON(t, &l, "-n", manifests.Namespace, "get", "pods", "-l", manifests.AgentSelector, "--field-selector", "spec.nodeName="+node, "-o", "json")
	for _, it := range l.Items {
		if it.Metadata.DeletionTimestamp != "" {
			continue
		}
		for _, cs := range it.Status.ContainerStatuses {
			if cs.Name == manifests.AgentContainer {
				_, id, _ := strings.Cut(cs.ContainerID, "://")
				return agentPod{name: it.Metadata.Name, containerID: id, restarts: cs.RestartCount}
			}
		}
	}
	t.Fatalf("no running agent pod on %s", node)
	return agentPod{}
}

// agentPID finds the agent's process on node by its container ID, which
// names the container's cgroup with either cgroup driver.
func agentPID(t *testing.T, node string, pod agentPod) string {
	t.Helper()
	if pod.containerID == "" {
		t.Fatalf("agent pod %s has no container ID", pod.name)
	}
	out, err := onNode(t, node, "sh", "-c", `for p in /proc/[0-9]*; do
  [ "$(cat $p/comm 2>/dev/null)" = kebpf-agent ] && grep -q "$1" $p/cgroup 2>/dev/null && echo ${p#/proc/}
done; true`, "sh", pod.containerID)
	pids := strings.Fields(out)
	if err != nil || len(pids) != 1 {
		t.Fatalf("agent process of %s (container %s) on %s: %v %q", pod.name, pod.containerID[:12], node, err, out)
	}
	return pids[0]
}

// killAgent sends SIGKILL to the agent: no shutdown code runs, as when the
// kernel's OOM killer or a node's runtime kills it.
func killAgent(t *testing.T, node string, pod agentPod) {
	t.Helper()
	pid := agentPID(t, node, pod)
	if out, err := onNode(t, node, "kill", "-KILL", pid); err != nil {
		t.Fatalf("kill -KILL %s on %s: %v %s", pid, node, err, out)
	}
}

// waitAgentRestarted waits for the kubelet to restart the killed agent
// container and for every agent to be ready again.
func waitAgentRestarted(t *testing.T, node string, before agentPod) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		if now := agentPodOn(t, node); now.name == before.name && now.restarts > before.restarts {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent %s on %s not restarted within 2 minutes of SIGKILL", before.name, node)
		}
	}
	waitAgentsReady(t)
}

// waitAgentsReady waits until the DaemonSet's pods are all ready and every
// node's NodeState says ready.
func waitAgentsReady(t *testing.T) {
	t.Helper()
	mustKubectl(t, 3*time.Minute, "-n", manifests.Namespace, "wait", "--for=condition=Ready", "pod", "-l", manifests.AgentSelector, "--timeout=150s")
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		st, r := status(t)
		ready := r.code == 0 && len(st.Nodes) == len(env.Cluster.Nodes)
		for _, n := range st.Nodes {
			ready = ready && n.Ready
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agents not ready: %s", r.stdout+r.stderr)
		}
	}
}

// agentCPUSeconds is the CPU time (user+system) the agent process used so
// far, from /proc/<pid>/stat, read on its node without the API server.
func agentCPUSeconds(t *testing.T, node string, pod agentPod) float64 {
	t.Helper()
	pid := agentPID(t, node, pod)
	out, err := onNode(t, node, "cat", "/proc/"+pid+"/stat")
	if err != nil {
		t.Fatalf("read the agent's stat on %s: %v", node, err)
	}
	// Fields after the parenthesised command: utime and stime are 14 and
	// 15 of the whole line, in clock ticks (USER_HZ, 100 on Linux).
	_, rest, _ := strings.Cut(out, ") ")
	f := strings.Fields(rest)
	if len(f) < 13 {
		t.Fatalf("unexpected /proc/%s/stat: %q", pid, out)
	}
	utime, err1 := strconv.ParseFloat(f[11], 64)
	stime, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("unexpected /proc/%s/stat: %q", pid, out)
	}
	return (utime + stime) / 100
}

// collectReliability reads every client stream's log (kubelet timestamps
// say when each probe ended) and counts the probes of each window.
func collectReliability(t *testing.T, windows []relWindow) []relCount {
	t.Helper()
	counts := make([]relCount, len(windows))
	for i := range 2 {
		pod := fmt.Sprintf("client-%d", i)
		for _, s := range relStreams {
			if s.firstNodeOnly && i > 0 {
				continue
			}
			r := kubectl(t, 2*time.Minute, "-n", relNamespace, "logs", pod, "-c", s.container, "--timestamps")
			if r.code != 0 {
				t.Fatalf("logs of %s/%s: %s", pod, s.container, r.stderr)
			}
			sc := bufio.NewScanner(strings.NewReader(r.stdout))
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				ts, line, ok := strings.Cut(sc.Text(), " ")
				if !ok {
					continue
				}
				at, err := time.Parse(time.RFC3339Nano, ts)
				if err != nil {
					t.Fatalf("%s/%s: log line without a timestamp: %q", pod, s.container, sc.Text())
				}
				var p probeResult
				if err := json.Unmarshal([]byte(line), &p); err != nil || (!p.OK && p.Error == "") {
					t.Fatalf("%s/%s: not a probe result: %q", pod, s.container, line)
				}
				for wi, w := range windows {
					if at.Before(w.start) || !at.Before(w.end) {
						continue
					}
					c := &counts[wi]
					allowed, failed, denied, wrong, first := &c.allowed, &c.failed, &c.denied, &c.wronglyAllowed, &c.firstFailures
					if s.proto == "http" {
						allowed, failed, denied, wrong, first = &c.l7Allowed, &c.l7Failed, &c.l7Denied, &c.l7WronglyAllowed, &c.firstL7Failures
					}
					bad := false
					if s.allowed {
						*allowed++
						if !p.OK {
							*failed++
							bad = true
							if p.Class == "refused" {
								c.refused++
							}
						}
					} else {
						*denied++
						if p.OK {
							*wrong++
							bad = true
						}
					}
					if bad && len(*first) < 5 {
						*first = append(*first, fmt.Sprintf("%s %s at %s: ok=%v %s peer %s",
							pod, s.container, at.Format("15:04:05.000"), p.OK, p.Error, p.Peer))
					}
				}
			}
		}
	}
	return counts
}
