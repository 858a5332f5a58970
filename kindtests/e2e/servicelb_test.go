package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
)

// lbNamespace holds the socket-LB suite's workloads.
const lbNamespace = "kebpf-lb"

// extIP is the suite's ExternalIP: inside the pod bridge's subnet but owned by
// nobody, so a connect that is not translated goes nowhere (never off the
// machine) and fails instead of passing by accident.
const extIP = "10.244.0.250"

// kubectlStdin runs kubectl with stdin.
func kubectlStdin(t *testing.T, stdin string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(env.BinDir, "kubectl"), args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+env.Cluster.Kubeconfig)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// probeFrom runs n probes from a pod of the suite and returns the results.
func probeFrom(t *testing.T, pod, proto, to string, n int, extra ...string) []probeResult {
	t.Helper()
	args := []string{"-n", lbNamespace, "exec", pod, "--", "/usr/local/bin/kebpf-testserver", "probe",
		"--protocol", proto, "--to", to, "--count", strconv.Itoa(n), "--timeout", "2s"}
	r := kubectl(t, 2*time.Minute, append(args, extra...)...)
	out, err := decodeNProbes(r, n)
	if err != nil {
		t.Fatalf("probe from %s to %s: %v", pod, to, err)
	}
	return out
}

// lbWorkloads are the suite's pods and Services: three backends, a pod
// client, and a hostNetwork client standing for processes of the node itself.
func lbWorkloads() string {
	var b strings.Builder
	fmt.Fprintf(&b, `apiVersion: v1
kind: Namespace
metadata: {name: %s}
`, lbNamespace)
	pod := func(name, node, labels string, hostNet bool, args string, ready int) {
		// The node's processes resolve through the cluster DNS too (the DNS
		// rows), as a node-local agent configured with it would.
		dnsPolicy := ""
		if hostNet {
			dnsPolicy = "ClusterFirstWithHostNet"
		}
		ports := `    ports:
    - {name: tcp-alt, containerPort: 8081, protocol: TCP}
    - {name: dns, containerPort: 53, protocol: UDP}
`
		if hostNet {
			ports = "" // a hostNetwork pod's ports are the node's
		}
		b.WriteString(serverPod{name: name, ns: lbNamespace, node: node, labels: labels, args: args, hostNetwork: hostNet, dnsPolicy: dnsPolicy,
			container: `    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
` + ports + fmt.Sprintf("    readinessProbe: {tcpSocket: {port: %d}, periodSeconds: 1}\n", ready)}.yaml())
	}
	// Backends on both nodes, one client on each: every row crosses nodes
	// for some samples, and internalTrafficPolicy: Local has one local
	// backend for the client and two for the hostclient, so a datapath
	// that used the other node's backends fails those rows.
	for n, node := range map[string]string{"web-a": nodeAt(0), "web-b": nodeAt(1), "web-c": nodeAt(1)} {
		pod(n, node, "app: web", false, "serve, --tcp, '80,8081', --udp, '53', --http, '0'", 8081)
	}
	pod("client", nodeAt(0), "app: client", false, "serve, --tcp, '8081', --udp, '', --http, '0'", 8081)
	pod("hostclient", nodeAt(1), "app: hostclient", true, "serve, --tcp, '18081', --udp, '', --http, '0'", 18081)
	svc := func(name, spec string) {
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Service
metadata: {name: %s, namespace: %s}
spec:
%s`, name, lbNamespace, spec)
	}
	svc("web", `  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
  - {name: alt, port: 8080, targetPort: tcp-alt, protocol: TCP}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
`)
	svc("none", `  selector: {app: nothing}
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
`)
	svc("sticky", `  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`)
	svc("local", `  selector: {app: web}
  internalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`)
	svc("np", `  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`)
	svc("ext", fmt.Sprintf(`  selector: {app: web}
  externalIPs: [%s]
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`, extIP))
	svc("headless", `  clusterIP: None
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 80, protocol: TCP}
`)
	return b.String()
}

// lbTopology is what the flow table's expectations are computed from.
type lbTopology struct {
	clusterIP map[string]string // service of the suite, kube-dns or kubernetes -> ClusterIP
	nodePort  int
	nodeIP    map[string]string // node -> InternalIP
	podNode   map[string]string // pod -> node
	podIP     map[string]string
}

func readTopology(t *testing.T) lbTopology {
	t.Helper()
	top := lbTopology{clusterIP: map[string]string{}, nodeIP: map[string]string{}, podNode: map[string]string{}, podIP: map[string]string{}}
	var svcs struct {
		Items []struct {
			Metadata struct{ Name string }
			Spec     struct {
				ClusterIP string `json:"clusterIP"`
				Ports     []struct {
					NodePort int `json:"nodePort"`
				}
			}
		}
	}
	kubectlJSON(t, &svcs, "-n", lbNamespace, "get", "svc", "-o", "json")
	for _, s := range svcs.Items {
		top.clusterIP[s.Metadata.Name] = s.Spec.ClusterIP
		if s.Metadata.Name == "np" {
			top.nodePort = s.Spec.Ports[0].NodePort
		}
	}
	for _, s := range []struct{ key, ns, name string }{{"kube-dns", "kube-system", "kube-dns"}, {"kubernetes", "default", "kubernetes"}} {
		var svc struct {
			Spec struct {
				ClusterIP string `json:"clusterIP"`
			}
		}
		kubectlJSON(t, &svc, "-n", s.ns, "get", "svc", s.name, "-o", "json")
		top.clusterIP[s.key] = svc.Spec.ClusterIP
	}
	var pods struct {
		Items []struct {
			Metadata struct{ Name string }
			Spec     struct {
				NodeName string `json:"nodeName"`
			}
			Status struct {
				PodIP string `json:"podIP"`
			}
		}
	}
	kubectlJSON(t, &pods, "-n", lbNamespace, "get", "pods", "-o", "json")
	for _, p := range pods.Items {
		top.podNode[p.Metadata.Name] = p.Spec.NodeName
		top.podIP[p.Metadata.Name] = p.Status.PodIP
	}
	var nodes struct {
		Items []struct {
			Metadata struct{ Name string }
			Status   struct {
				Addresses []struct{ Type, Address string }
			}
		}
	}
	kubectlJSON(t, &nodes, "get", "nodes", "-o", "json")
	for _, n := range nodes.Items {
		for _, a := range n.Status.Addresses {
			if a.Type == "InternalIP" && net.ParseIP(a.Address).To4() != nil {
				top.nodeIP[n.Metadata.Name] = a.Address
			}
		}
	}
	return top
}

// flow is one row of the socket-LB truth table.
type flow struct {
	name    string
	from    string // client pod
	proto   string // tcp or udp
	to      string // address:port the client dials
	extra   []string
	want    []string // backend pods that may answer; nil: connect refused at once
	peer    string   // what getpeername()/recvfrom() must show ("" = not checked)
	samples int
}

func webBackends() []string { return []string{"web-a", "web-b", "web-c"} }

func lbFlows(top lbTopology) []flow {
	web := top.clusterIP["web"]
	var fl []flow
	for _, from := range []string{"client", "hostclient"} {
		node := top.podNode[from]
		var local []string
		for _, b := range webBackends() {
			if top.podNode[b] == node {
				local = append(local, b)
			}
		}
		fl = append(fl,
			flow{name: "clusterIP tcp", from: from, proto: "tcp", to: web + ":80", want: webBackends(), peer: web + ":80", samples: 15},
			flow{name: "clusterIP named targetPort", from: from, proto: "tcp", to: web + ":8080", want: webBackends(), peer: web + ":8080", samples: 15},
			flow{name: "clusterIP udp connected", from: from, proto: "udp", to: web + ":53", want: webBackends(), peer: web + ":53", samples: 15},
			flow{name: "clusterIP udp unconnected (reply source is the ClusterIP)", from: from, proto: "udp", to: web + ":53", extra: []string{"--unconnected"}, want: webBackends(), peer: web + ":53", samples: 15},
			flow{name: "no endpoints tcp refused", from: from, proto: "tcp", to: top.clusterIP["none"] + ":80", samples: 3},
			flow{name: "no endpoints udp refused", from: from, proto: "udp", to: top.clusterIP["none"] + ":53", samples: 3},
			flow{name: "sessionAffinity ClientIP", from: from, proto: "tcp", to: top.clusterIP["sticky"] + ":80", want: webBackends(), samples: 10},
			flow{name: "internalTrafficPolicy Local", from: from, proto: "tcp", to: top.clusterIP["local"] + ":80", want: local, samples: 10},
			flow{name: "externalIP", from: from, proto: "tcp", to: extIP + ":80", want: webBackends(), samples: 10},
			flow{name: "pod IP untouched", from: from, proto: "tcp", to: top.podIP["web-b"] + ":80", want: []string{"web-b"}, samples: 3},
		)
		for n, ip := range top.nodeIP {
			fl = append(fl, flow{name: "nodePort on " + n, from: from, proto: "tcp", to: fmt.Sprintf("%s:%d", ip, top.nodePort), want: webBackends(), samples: 10})
		}
	}
	return fl
}

func checkFlow(t *testing.T, f flow) {
	t.Helper()
	res := probeFrom(t, f.from, f.proto, f.to, f.samples, f.extra...)
	seen := map[string]int{}
	for _, r := range res {
		if f.want == nil {
			if r.OK || r.Class != "refused" {
				t.Errorf("%s -> %s: want ECONNREFUSED at once, got ok=%v class=%q err=%q", f.from, f.to, r.OK, r.Class, r.Error)
			}
			continue
		}
		if !r.OK {
			t.Errorf("%s -> %s: %s (%s)", f.from, f.to, r.Error, r.Class)
			continue
		}
		seen[r.Reply]++
		if !slices.Contains(f.want, r.Reply) {
			t.Errorf("%s -> %s answered by %q, want one of %v", f.from, f.to, r.Reply, f.want)
		}
		if f.peer != "" && r.Peer != f.peer {
			t.Errorf("%s -> %s: peer %q, want %q (the app must see the Service address)", f.from, f.to, r.Peer, f.peer)
		}
	}
	var names []string
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	t.Logf("%s %s -> %s: answered by %v", f.from, f.proto, f.to, seen)
	switch {
	case strings.HasPrefix(f.name, "sessionAffinity") && len(seen) > 1:
		t.Errorf("%s -> %s: ClientIP affinity spread over %v", f.from, f.to, names)
	case len(f.want) > 1 && !strings.HasPrefix(f.name, "sessionAffinity") && len(seen) < 2 && f.samples >= 10:
		t.Errorf("%s -> %s: %d connects all went to %v; want them spread over %v", f.from, f.to, f.samples, names, f.want)
	}
}

// lbStats reads the datapath's verdict counters from an agent's metrics.
func lbStats(t *testing.T, node string) map[string]float64 {
	t.Helper()
	out, err := onNode(t, node, "curl", "-sf", "http://127.0.0.1:9890/metrics")
	if err != nil {
		t.Fatalf("metrics on %s: %v", node, err)
	}
	m := map[string]float64{}
	for _, l := range strings.Split(out, "\n") {
		if !strings.HasPrefix(l, "kebpf_lb_connects_total{") {
			continue
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("metrics on %s: line %q: %v", node, l, err)
		}
		m[f[0]] = v
	}
	return m
}

// kubeProxySwitch is the provider's kube-proxy on/off switch; every
// provider of the suite has one.
func kubeProxySwitch(t *testing.T) cluster.KubeProxySwitch {
	t.Helper()
	p, err := env.ProviderOf()
	if err != nil {
		t.Fatal(err)
	}
	kp, ok := p.(cluster.KubeProxySwitch)
	if !ok {
		t.Fatalf("provider %s cannot switch kube-proxy off and on", p.Name())
	}
	return kp
}

// TestIntegrationServiceLB runs the socket-LB truth table through the
// installed DaemonSet from real pods and from the node, first without
// kube-proxy (our datapath alone makes Services work), then beside it.
func TestIntegrationServiceLB(t *testing.T) {
	requireEnv(t)
	kp := kubeProxySwitch(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", lbNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
		if err := kp.SetKubeProxy(context.Background(), env.Name, true); err != nil {
			t.Errorf("restore kube-proxy: %v", err)
		}
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	kubectlStdin(t, lbWorkloads(), "apply", "-f", "-")
	mustKubectl(t, 3*time.Minute, "-n", lbNamespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	top := readTopology(t)
	if len(env.Cluster.Nodes) > 1 && (top.podNode["client"] == top.podNode["hostclient"] || top.podNode["web-a"] == top.podNode["web-b"]) {
		t.Fatalf("pods not spread over two nodes: %v", top.podNode)
	}

	for _, mode := range []struct {
		name      string
		kubeProxy bool
	}{{"without kube-proxy", false}, {"beside kube-proxy", true}} {
		t.Run(mode.name, func(t *testing.T) {
			if err := kp.SetKubeProxy(context.Background(), env.Name, mode.kubeProxy); err != nil {
				t.Fatal(err)
			}
			before := map[string]map[string]float64{}
			for _, n := range env.Cluster.Nodes {
				before[n] = lbStats(t, n)
			}
			for _, f := range lbFlows(top) {
				t.Run(f.from+"/"+f.name, func(t *testing.T) { checkFlow(t, f) })
			}
			for _, d := range dnsLookups(top) {
				t.Run(d.from+"/dns "+d.name, func(t *testing.T) { checkDNS(t, top, d) })
			}
			// Beside kube-proxy too, the socket LB must have translated first.
			for _, n := range env.Cluster.Nodes {
				after := lbStats(t, n)
				for k, v := range after {
					if strings.Contains(k, `"translated"`) && v <= before[n][k] {
						t.Errorf("node %s: %s did not grow (%v -> %v)", n, k, before[n][k], v)
					}
				}
				if len(after) == 0 {
					t.Errorf("node %s exports no kebpf_lb_connects_total", n)
				}
			}
			if !mode.kubeProxy {
				t.Run("client/dns control: no answer with service-lb off", func(t *testing.T) { checkDNSNeedsLB(t, top) })
			}
		})
	}
}

// checkDNSNeedsLB is the DNS rows' control: with kube-proxy absent and
// service-lb disabled nothing translates kube-dns's ClusterIP, so the same
// lookup must time out; the rows above then passed because of the socket LB.
// From the pod only: its untranslated datagrams die at the pod bridge's
// FORWARD drop, a node process's would leave through the uplink.
func checkDNSNeedsLB(t *testing.T, top lbTopology) {
	mustKubectl(t, 3*time.Minute, "ebpf", "disable", "service-lb", "--wait")
	defer mustKubectl(t, 3*time.Minute, "ebpf", "enable", "service-lb", "--wait")
	r := kubectl(t, time.Minute, "-n", lbNamespace, "exec", "client", "--", "/usr/local/bin/kebpf-testserver", "probe",
		"--protocol", "dns", "--to", "web", "--timeout", "2s")
	res, err := decodeNProbes(r, 1)
	if err != nil {
		t.Fatal(err)
	}
	if res[0].OK || res[0].Class != "timeout" {
		t.Errorf("lookup of web with service-lb off and no kube-proxy: %+v; want a timeout (what answered?)", res[0])
	}
}

// TestIntegrationServiceLBSwitch turns service-lb off and on while a client
// connects in a loop beside kube-proxy: kube-proxy serves the Service while
// the socket LB is off, so not one connect may fail, and status converges.
func TestIntegrationServiceLBSwitch(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", lbNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	kubectlStdin(t, lbWorkloads(), "apply", "-f", "-")
	mustKubectl(t, 3*time.Minute, "-n", lbNamespace, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	top := readTopology(t)

	// ~12 s of connects, one every 50 ms, spanning both switches.
	type loopOut struct {
		res []probeResult
		err error
	}
	done := make(chan loopOut, 1)
	go func() {
		// runKubectl calls t.Fatal only when kubectl cannot start at all,
		// which ends this goroutine before the test reads done: the
		// test then fails on the missing answer, never hangs past it.
		r := kubectlQuiet(t, 3*time.Minute, "-n", lbNamespace, "exec", "client", "--", "/usr/local/bin/kebpf-testserver", "probe",
			"--protocol", "tcp", "--to", top.clusterIP["web"]+":80", "--count", "240", "--interval", "50ms", "--timeout", "2s")
		res, err := decodeNProbes(r, 240)
		done <- loopOut{res, err}
	}()
	time.Sleep(2 * time.Second)
	mustKubectl(t, 3*time.Minute, "ebpf", "disable", "service-lb", "--wait")
	s, _ := status(t)
	for _, n := range s.Nodes {
		if slices.Contains(n.Active, "service-lb") {
			t.Errorf("node %s still reports service-lb active after disable --wait", n.Name)
		}
	}
	for _, node := range env.Cluster.Nodes {
		for _, a := range inspectNode(t, node).attached {
			if strings.Contains(a, "kebpf_connect") {
				t.Errorf("node %s: %s still attached after disable", node, a)
			}
		}
	}
	time.Sleep(2 * time.Second)
	mustKubectl(t, 3*time.Minute, "ebpf", "enable", "service-lb", "--wait")
	var lo loopOut
	select {
	case lo = <-done:
	case <-time.After(4 * time.Minute):
		t.Fatal("client loop never finished")
	}
	if lo.err != nil {
		t.Fatalf("client loop: %v", lo.err)
	}
	failed := 0
	for _, r := range lo.res {
		if !r.OK {
			failed++
			t.Errorf("connect failed during the switch: %s (%s)", r.Error, r.Class)
		}
	}
	t.Logf("%d connects across disable+enable, %d failed", len(lo.res), failed)
	if s, r := status(t); r.code != 0 {
		t.Errorf("status after enable: exit %d: %+v", r.code, s)
	}
	for _, node := range env.Cluster.Nodes {
		n := 0
		for _, a := range inspectNode(t, node).attached {
			if strings.Contains(a, "kebpf_connect") {
				n++
			}
		}
		if n == 0 {
			t.Errorf("node %s: no kebpf_connect program attached after enable", node)
		}
	}
}

// dnsLookup is one row of the DNS table: a name looked up from a client
// through the cluster DNS (kube-dns's ClusterIP, so through the socket LB).
type dnsLookup struct {
	name, from string
	to         string   // the name
	want       string   // the Service whose ClusterIP must answer
	extra      []string // transport flags
}

func dnsLookups(top lbTopology) []dnsLookup {
	var rows []dnsLookup
	for _, from := range []string{"client", "hostclient"} {
		for _, tr := range []struct {
			name  string
			extra []string
		}{
			{"udp connected", nil},
			// glibc's resolver sends from an unconnected socket: only the
			// recvmsg hook makes the answer come from the address asked.
			{"udp unconnected", []string{"--unconnected"}},
			{"tcp", []string{"--transport", "tcp"}},
		} {
			rows = append(rows,
				dnsLookup{name: tr.name + " Service short name", from: from, to: "web", want: "web", extra: tr.extra},
				dnsLookup{name: tr.name + " kubernetes.default", from: from, to: "kubernetes.default", want: "kubernetes", extra: tr.extra},
			)
		}
	}
	return rows
}

// checkDNS looks d.to up three times from d.from. The pod's resolv.conf names
// kube-dns's ClusterIP, which only the socket LB translates when kube-proxy
// is absent; every answer must name the Service's ClusterIP and come from
// kube-dns's ClusterIP (for TCP: getpeername), never from the CoreDNS pod.
func checkDNS(t *testing.T, top lbTopology, d dnsLookup) {
	t.Helper()
	dns := top.clusterIP["kube-dns"]
	if dns == "" || top.clusterIP[d.want] == "" {
		t.Fatalf("no ClusterIP for kube-dns (%q) or %s (%q)", dns, d.want, top.clusterIP[d.want])
	}
	want := net.JoinHostPort(dns, "53")
	for _, r := range probeFrom(t, d.from, "dns", d.to, 3, d.extra...) {
		if !r.OK {
			t.Errorf("%s: lookup %s: %s (%s), asked %q", d.from, d.to, r.Error, r.Class, r.Server)
			continue
		}
		if r.Reply != top.clusterIP[d.want] {
			t.Errorf("%s: lookup %s = %q, want the ClusterIP of %s %s", d.from, d.to, r.Reply, d.want, top.clusterIP[d.want])
		}
		if r.Server != want || r.Peer != want {
			t.Errorf("%s: lookup %s asked %q and was answered from %q; want %s for both (resolvers drop answers from another address)", d.from, d.to, r.Server, r.Peer, want)
		}
	}
}
