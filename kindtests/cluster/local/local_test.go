package local

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Helper()
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestSplitRule(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string
	}{
		{"plain", "-A FORWARD -j KUBE-FORWARD", []string{"-A", "FORWARD", "-j", "KUBE-FORWARD"}},
		{"quoted", `-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD`,
			[]string{"-A", "FORWARD", "-m", "comment", "--comment", "kubernetes forwarding rules", "-j", "KUBE-FORWARD"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := splitRule(tt.in)
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Fatalf("splitRule(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestIntegrationLocalCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping local cluster integration test in -short mode (needs root, builds Kubernetes)")
	}
	if ok, why := cluster.CreateInTests(); !ok {
		t.Skip(why)
	}
	p := New()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	if err := p.Available(ctx); err != nil {
		// This provider exists for machines like this one: unavailable here
		// means a missing install step, not a machine without the feature.
		t.Fatalf("local provider unavailable: %v (run make deps as root)", err)
	}
	name := "kebpf-it"
	s := newState(name)
	if s.alive("kube-apiserver") > 0 {
		t.Fatalf("a cluster %q already runs; delete it first", name)
	}
	before := map[string]string{}
	for _, k := range watchedSysctls {
		if v, ok := readSysctl(k); ok {
			before[k] = v
		}
	}
	log := testLog{t}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range s.nodes() {
				for _, c := range []string{kubeletComponent(n), containerdComponent(n), kubeProxyComponent(n)} {
					t.Logf("---- %s log tail:\n%s", c, tail(s.logFile(c), 40))
				}
			}
		}
		if os.Getenv("KEBPF_KEEP_CLUSTER") != "" {
			t.Logf("KEBPF_KEEP_CLUSTER set: cluster %q left running", name)
			return
		}
		if err := p.Delete(context.Background(), name, log); err != nil {
			t.Errorf("cleanup delete: %v", err)
		}
	})

	start := time.Now()
	c, err := p.Create(ctx, cluster.Options{Name: name, KubeProxy: true, Nodes: 2, Log: log})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Logf("create took %s", time.Since(start).Round(time.Millisecond))
	if !slices.Equal(c.Nodes, []string{NodeName, NodeName + "2"}) {
		t.Fatalf("nodes = %v", c.Nodes)
	}
	if _, err := p.Create(ctx, cluster.Options{Name: name, KubeProxy: true, Nodes: 3, Log: log}); err == nil || !strings.Contains(err.Error(), "has 2 node(s), 3 asked") {
		t.Errorf("create with another node count: %v, want a refusal naming both counts", err)
	}
	start = time.Now()
	if _, err := p.Create(ctx, cluster.Options{Name: name, KubeProxy: true, Nodes: 2, Log: log}); err != nil {
		t.Fatalf("second create (reuse): %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("reusing a healthy cluster took %s", d)
	}

	if err := p.LoadImages(ctx, name, []string{pauseTarball()}); err != nil {
		t.Fatalf("load images: %v", err)
	}

	cs, err := s.clientset()
	if err != nil {
		t.Fatal(err)
	}
	nodes := s.nodes()
	for _, n := range nodes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "pause-" + n.Name, Namespace: "default"},
			Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{
				Name: "pause", Image: PauseImage, ImagePullPolicy: corev1.PullNever,
			}}},
		}
		if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod: %v", err)
		}
	}
	hostBPF, err := os.Stat("/sys/fs/bpf")
	if err != nil {
		t.Fatal(err)
	}
	bpffsDevs := map[string]string{}
	for _, n := range nodes {
		var ip string
		deadline := time.Now().Add(2 * time.Minute)
		for {
			got, err := cs.CoreV1().Pods("default").Get(ctx, "pause-"+n.Name, metav1.GetOptions{})
			if err == nil && got.Status.Phase == corev1.PodRunning && got.Status.PodIP != "" {
				ip = got.Status.PodIP
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pod on %s not running: %+v (err %v)", n.Name, got.Status, err)
			}
			time.Sleep(500 * time.Millisecond)
		}
		_, subnet, _ := net.ParseCIDR(n.PodCIDR())
		if !subnet.Contains(net.ParseIP(ip)) || ip == n.PodGateway() {
			t.Errorf("pod IP %s on %s not in %s", ip, n.Name, n.PodCIDR())
		}
		t.Logf("pod on %s running with IP %s", n.Name, ip)
		kubectl := exec.CommandContext(ctx, filepath.Join(k8sbin.BinDir(), "kubectl"), "--kubeconfig", c.Kubeconfig, "logs", "pause-"+n.Name)
		if out, err := kubectl.CombinedOutput(); err != nil {
			t.Errorf("kubectl logs (apiserver -> kubelet of %s): %v: %s", n.Name, err, out)
		}
		// The node's own namespaces: its pod bridge and address, cgroup
		// namespace root, bpffs instance.
		if out, err := p.Exec(ctx, name, n.Name, "ip", "-o", "addr", "show"); err != nil || !strings.Contains(string(out), PodBridge) || !strings.Contains(string(out), n.IP()+"/24") {
			t.Errorf("exec on %s: want %s and %s: %v: %s", n.Name, PodBridge, n.IP(), err, out)
		}
		if out, err := p.Exec(ctx, name, n.Name, "cat", "/proc/self/cgroup"); err != nil || strings.Contains(string(out), n.Name) || !strings.Contains(string(out), "0::/\n") {
			t.Errorf("cgroups seen on %s are not rooted at the node: %v: %s", n.Name, err, out)
		}
		out, err := p.Exec(ctx, name, n.Name, "stat", "-f", "-c", "%T", "/sys/fs/bpf")
		if err != nil || strings.TrimSpace(string(out)) != "bpf_fs" {
			t.Errorf("/sys/fs/bpf on %s: %v: %s", n.Name, err, out)
		}
		out, err = p.Exec(ctx, name, n.Name, "stat", "-c", "%d", "/sys/fs/bpf")
		if err != nil {
			t.Errorf("stat bpffs on %s: %v: %s", n.Name, err, out)
		}
		bpffsDevs[n.Name] = strings.TrimSpace(string(out))
	}
	seen := map[string]string{fmt.Sprint(hostBPF.Sys().(*syscall.Stat_t).Dev): "the host"}
	for n, dev := range bpffsDevs {
		if other, dup := seen[dev]; dup {
			t.Errorf("%s shares its bpffs (dev %s) with %s", n, dev, other)
		}
		seen[dev] = n
	}
	t.Run("cluster DNS", func(t *testing.T) { testClusterDNS(ctx, t, p, name, c.Kubeconfig) })

	if err := p.Delete(ctx, name, log); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if pids := findProcs(func(argv []string) bool {
		return ourBinaries[baseName(argv[0])] && hasArgPrefix(argv, s.dir)
	}); len(pids) > 0 {
		t.Errorf("processes of ours survive delete: %v", pids)
	}
	if linkExists(Bridge) {
		t.Errorf("bridge %s survives delete", Bridge)
	}
	if out, _ := exec.Command("iptables-save").Output(); strings.Contains(string(out), "kubectl-ebpf-local:"+name) || strings.Contains(string(out), ":KUBE-") {
		t.Errorf("iptables rules survive delete:\n%s", out)
	}
	for k, v := range before {
		if now, _ := readSysctl(k); now != v {
			t.Errorf("sysctl %s = %s after delete, want %s", k, now, v)
		}
	}
	if m := mountsUnder(s.dir, s.runDir); len(m) > 0 {
		t.Errorf("mounts survive delete: %v", m)
	}
	for _, n := range nodes {
		if _, err := os.Stat("/run/netns/" + n.netns()); err == nil {
			t.Errorf("netns of %s survives delete", n.Name)
		}
		if d := cgroupTree(n); len(d) > 0 {
			t.Errorf("cgroups of %s survive delete: %v", n.Name, d)
		}
	}
	if _, err := os.Stat(s.dir); err == nil {
		t.Errorf("state dir %s survives delete", s.dir)
	}
}

func baseName(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[i+1:]
	}
	return p
}

func TestMountsUnder(t *testing.T) {
	if got := mountsUnder("/proc"); len(got) == 0 || got[len(got)-1] != "/proc" {
		t.Errorf("mountsUnder(/proc) = %v, want /proc last (deepest first)", got)
	}
	if got := mountsUnder("/nonexistent-kebpf"); len(got) != 0 {
		t.Errorf("mountsUnder(/nonexistent-kebpf) = %v", got)
	}
}
