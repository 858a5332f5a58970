package local

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/images"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

// dnsProbeResult is the JSON line of `kebpf-testserver probe --protocol dns`.
type dnsProbeResult struct {
	OK       bool   `json:"ok"`
	Reply    string `json:"reply"`
	Error    string `json:"error"`
	Class    string `json:"class"`
	Peer     string `json:"peer"`
	Server   string `json:"server"`
	Duration string `json:"duration"`
}

// testClusterDNS proves the cluster DNS a pod gets: its resolv.conf names
// kube-dns, and lookups over UDP (connected and not) and TCP answer with the
// kubernetes Service's ClusterIP, from the kube-dns ClusterIP; outside names
// fail at once (no forward).
func testClusterDNS(ctx context.Context, t *testing.T, p *Provider, name, kubeconfig string) {
	s := newState(name)
	cs, err := s.clientset()
	if err != nil {
		t.Fatal(err)
	}
	svc, err := cs.CoreV1().Services("kube-system").Get(ctx, "kube-dns", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("kube-dns Service: %v", err)
	}
	if svc.Spec.ClusterIP != DNSServiceIP {
		t.Fatalf("kube-dns ClusterIP %s, want %s", svc.Spec.ClusterIP, DNSServiceIP)
	}
	k8s, err := cs.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// The test server's image only: the whole product (Envoy included) is
	// not needed to prove DNS.
	root, err := k8sbin.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	bin, tarball := filepath.Join(dir, "kebpf-testserver"), filepath.Join(dir, "testserver.tar")
	const image = "localhost/kubectl-ebpf/testserver:local-it"
	if err := images.GoBuild(ctx, root, "./kindtests/testserver", bin, "local-it"); err != nil {
		t.Fatal(err)
	}
	if err := images.BuildBinaryImage(ctx, image, map[string]string{"/usr/local/bin/kebpf-testserver": bin, "/usr/bin/nslookup": bin}, []string{"/usr/local/bin/kebpf-testserver"}, tarball); err != nil {
		t.Fatal(err)
	}
	if err := p.LoadImages(ctx, name, []string{tarball}); err != nil {
		t.Fatal(err)
	}
	// One client per node: CoreDNS runs on one of them, so the other's
	// lookups cross the node network.
	nodes := s.nodes()
	podIPs := map[string]string{}
	for _, n := range nodes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "dnsclient-" + n.Name, Namespace: "default"},
			Spec: corev1.PodSpec{
				NodeName:                      n.Name,
				TerminationGracePeriodSeconds: new(int64),
				Containers: []corev1.Container{{
					Name: "main", Image: image, ImagePullPolicy: corev1.PullNever,
					Args: []string{"serve", "--tcp", "8081", "--udp", "", "--http", "0"},
				}},
			},
		}
		if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range nodes {
		deadline := time.Now().Add(2 * time.Minute)
		for {
			got, err := cs.CoreV1().Pods("default").Get(ctx, "dnsclient-"+n.Name, metav1.GetOptions{})
			if err == nil && got.Status.Phase == corev1.PodRunning {
				podIPs[n.Name] = got.Status.PodIP
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("dns client pod on %s not running: %v %+v", n.Name, err, got.Status)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	kubectlOn := func(n node, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, filepath.Join(k8sbin.BinDir(), "kubectl"), append([]string{"--kubeconfig", kubeconfig, "exec", "dnsclient-" + n.Name, "--"}, args...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil && stderr.Len() > 0 {
			t.Logf("stderr: %s", stderr.String())
		}
		return string(out), err
	}
	kubectl := func(args ...string) (string, error) { return kubectlOn(nodes[0], args...) }
	if len(nodes) > 1 {
		// Pod to pod across nodes, both ways, through the nodes' routes.
		for i, from := range nodes {
			to := nodes[(i+1)%len(nodes)]
			out, err := kubectlOn(from, "/usr/local/bin/kebpf-testserver", "probe", "--protocol", "tcp", "--to", podIPs[to.Name]+":8081", "--timeout", "5s")
			if err != nil || !strings.Contains(out, `"ok":true`) {
				t.Errorf("pod on %s -> pod on %s (%s:8081): %v: %s", from.Name, to.Name, podIPs[to.Name], err, out)
			}
		}
	}
	for _, n := range nodes {
		for _, tc := range []struct {
			name, to string
			args     []string
		}{
			{"udp connected, search list", "kubernetes.default", nil},
			{"udp unconnected, search list", "kubernetes.default", []string{"--unconnected"}},
			{"tcp, search list", "kubernetes.default", []string{"--transport", "tcp"}},
			{"udp connected, fqdn", "kubernetes.default.svc.cluster.local.", nil},
			{"udp unconnected, fqdn", "kubernetes.default.svc.cluster.local.", []string{"--unconnected"}},
			{"tcp, fqdn", "kubernetes.default.svc.cluster.local.", []string{"--transport", "tcp"}},
		} {
			t.Run(n.Name+"/"+tc.name, func(t *testing.T) {
				args := append([]string{"/usr/local/bin/kebpf-testserver", "probe", "--protocol", "dns", "--to", tc.to, "--timeout", "5s"}, tc.args...)
				out, err := kubectlOn(n, args...)
				var r dnsProbeResult
				if jerr := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); jerr != nil {
					t.Fatalf("probe: %v (exec: %v): %q", jerr, err, out)
				}
				if !r.OK || r.Reply != k8s.Spec.ClusterIP {
					t.Fatalf("lookup %s: %+v, want %s", tc.to, r, k8s.Spec.ClusterIP)
				}
				if want := DNSServiceIP + ":53"; r.Server != want || r.Peer != want {
					t.Errorf("lookup %s: asked %q, answered from %q; want %s for both", tc.to, r.Server, r.Peer, want)
				}
				t.Logf("%s -> %s from %s in %s", tc.to, r.Reply, r.Peer, r.Duration)
			})
		}
	}
	// What a user types: nslookup from a pod of each node.
	for _, n := range nodes {
		out, err := kubectlOn(n, "nslookup", "kubernetes.default")
		if err != nil || !strings.Contains(out, "Name:\tkubernetes.default.svc.cluster.local\nAddress: "+k8s.Spec.ClusterIP+"\n") ||
			!strings.Contains(out, "Server:\t\t"+DNSServiceIP+"\n") {
			t.Errorf("nslookup kubernetes.default on %s: %v:\n%s", n.Name, err, out)
		}
	}
	t.Run("outside names fail at once", func(t *testing.T) {
		out, _ := kubectl("/usr/local/bin/kebpf-testserver", "probe", "--protocol", "dns", "--to", "example.com.", "--timeout", "5s")
		var r dnsProbeResult
		if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); err != nil {
			t.Fatalf("probe: %v: %q", err, out)
		}
		d, _ := time.ParseDuration(r.Duration)
		t.Logf("example.com: %s (%s) in %s", r.Error, r.Class, r.Duration)
		if r.OK || r.Class == "timeout" || d > 2*time.Second {
			t.Errorf("example.com: %+v; want a fast failure (REFUSED), no forward exists", r)
		}
	})
}
