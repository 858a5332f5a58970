package local

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
			for _, n := range []string{"kubelet", "containerd", "kube-proxy"} {
				t.Logf("---- %s log tail:\n%s", n, tail(s.logFile(n), 40))
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
	c, err := p.Create(ctx, cluster.Options{Name: name, KubeProxy: true, Log: log})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Logf("create took %s", time.Since(start).Round(time.Millisecond))
	if len(c.Nodes) != 1 || c.Nodes[0] != NodeName {
		t.Fatalf("nodes = %v", c.Nodes)
	}
	start = time.Now()
	if _, err := p.Create(ctx, cluster.Options{Name: name, KubeProxy: true, Log: log}); err != nil {
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
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "pause", Namespace: "default"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "pause", Image: PauseImage, ImagePullPolicy: corev1.PullNever,
		}}},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	var ip string
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got, err := cs.CoreV1().Pods("default").Get(ctx, "pause", metav1.GetOptions{})
		if err == nil && got.Status.Phase == corev1.PodRunning && got.Status.PodIP != "" {
			ip = got.Status.PodIP
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod not running: %+v (err %v)", got.Status, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	_, subnet, _ := net.ParseCIDR(PodCIDR)
	if !subnet.Contains(net.ParseIP(ip)) || ip == NodeIP {
		t.Errorf("pod IP %s not in %s", ip, PodCIDR)
	}
	t.Logf("pod running with IP %s", ip)
	kubectl := exec.CommandContext(ctx, filepath.Join(k8sbin.BinDir(), "kubectl"), "--kubeconfig", c.Kubeconfig, "logs", "pause")
	if out, err := kubectl.CombinedOutput(); err != nil {
		t.Errorf("kubectl logs (apiserver -> kubelet): %v: %s", err, out)
	}
	if out, err := p.Exec(ctx, name, NodeName, "ip", "-o", "link", "show", Bridge); err != nil || !strings.Contains(string(out), Bridge) {
		t.Errorf("exec on node: %v: %s", err, out)
	}
	t.Run("cluster DNS", func(t *testing.T) { testClusterDNS(ctx, t, p, name, c.Kubeconfig) })

	if err := p.Delete(ctx, name, log); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if pids := findProcs(func(argv []string) bool {
		return ourBinaries[baseName(argv[0])] && (hasArgPrefix(argv, s.dir) || hasArg(argv, s.sock))
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
	if ns := cniNetns(); len(ns) > 0 {
		t.Errorf("netns survive delete: %v", ns)
	}
	if _, err := os.Stat(s.dir); err == nil {
		t.Errorf("state dir %s survives delete", s.dir)
	}
	if d := kubepodsDirs(); len(d) > 0 {
		t.Errorf("kubepods cgroups survive delete: %v", d)
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
