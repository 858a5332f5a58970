package podindex

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

func pod(ns, name, uid, node string, ips ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec: corev1.PodSpec{NodeName: node}, Status: corev1.PodStatus{Phase: corev1.PodRunning}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func nn(ns, name string) types.NamespacedName { return types.NamespacedName{Namespace: ns, Name: name} }

func TestPodByIP(t *testing.T) {
	x := New("n1", t.TempDir())
	a := pod("default", "a", "uid-a", "n1", "10.244.1.5", "fd00::5")
	x.OnAdd(a, true)
	x.OnAdd(pod("other", "remote", "uid-r", "n2", "10.244.2.7"), true)
	host := pod("kube-system", "host", "uid-h", "n1", "172.18.0.2")
	host.Spec.HostNetwork = true
	x.OnAdd(host, true)

	for ip, want := range map[string]types.NamespacedName{
		"10.244.1.5": nn("default", "a"), "fd00::5": nn("default", "a"), "::ffff:10.244.1.5": nn("default", "a"),
		"10.244.2.7": nn("other", "remote"), // pods of every node
	} {
		if got, ok := x.PodByIP(netip.MustParseAddr(ip)); !ok || got != want {
			t.Errorf("PodByIP(%s) = %v, %v; want %v", ip, got, ok, want)
		}
	}
	if got, ok := x.PodByIP(netip.MustParseAddr("172.18.0.2")); ok {
		t.Errorf("hostNetwork pod's IP named %v", got)
	}

	// IP reused: the new pod holds it; deleting the old one must not unname it.
	b := pod("default", "b", "uid-b", "n1", "10.244.1.5")
	x.OnAdd(b, false)
	x.OnDelete(cache.DeletedFinalStateUnknown{Key: "default/a", Obj: a})
	if got, ok := x.PodByIP(netip.MustParseAddr("10.244.1.5")); !ok || got != nn("default", "b") {
		t.Errorf("after reuse and delete: %v, %v; want default/b", got, ok)
	}
	if _, ok := x.PodByIP(netip.MustParseAddr("fd00::5")); ok {
		t.Error("deleted pod's other IP still named")
	}
	// A finished pod releases its IP.
	done := b.DeepCopy()
	done.Status.Phase = corev1.PodSucceeded
	x.OnUpdate(b, done)
	if _, ok := x.PodByIP(netip.MustParseAddr("10.244.1.5")); ok {
		t.Error("succeeded pod's IP still named")
	}
}

// mkdirs creates a kubelet-like cgroup tree and returns the directory.
func mkdir(t *testing.T, parts ...string) string {
	t.Helper()
	p := filepath.Join(parts...)
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPodByCgroup(t *testing.T) {
	root := t.TempDir()
	const uidA = "0b8e7c2a-1d3f-4e5a-9b6c-7d8e9f0a1b2c"
	const uidB = "11111111-2222-3333-4444-555555555555"
	cidA := strings.Repeat("a1", 32)
	cidB := strings.Repeat("b2", 32)
	// cgroupfs layout (pod A) and systemd layout (pod B).
	podA := mkdir(t, root, "kubepods", "besteffort", "pod"+uidA)
	ctrA := mkdir(t, podA, cidA)
	podB := mkdir(t, root, "kubelet.slice", "kubelet-kubepods.slice", "kubelet-kubepods-burstable.slice",
		"kubelet-kubepods-burstable-pod"+strings.ReplaceAll(uidB, "-", "_")+".slice")
	ctrB := mkdir(t, podB, "cri-containerd-"+cidB+".scope")
	other := mkdir(t, root, "system.slice", "containerd.service")

	now := time.Unix(1000, 0)
	x := New("n1", root)
	x.now = func() time.Time { return now }
	a := pod("default", "a", uidA, "n1", "10.244.1.5")
	a.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "web", ContainerID: "containerd://" + cidA}}
	x.OnAdd(a, true)
	b := pod("team", "b", uidB, "n1", "10.244.1.6")
	b.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: "init", ContainerID: "containerd://" + cidB}}
	x.OnAdd(b, true)

	for _, tc := range []struct {
		dir       string
		pod       types.NamespacedName
		container string
		ok        bool
	}{
		{ctrA, nn("default", "a"), "web", true},
		{podA, nn("default", "a"), "", true},
		{ctrB, nn("team", "b"), "init", true},
		{other, types.NamespacedName{}, "", false},
	} {
		p, c, ok := x.PodByCgroup(ino(t, tc.dir))
		if p != tc.pod || c != tc.container || ok != tc.ok {
			t.Errorf("PodByCgroup(%s) = %v %q %v; want %v %q %v", tc.dir, p, c, ok, tc.pod, tc.container, tc.ok)
		}
	}

	if _, _, ips, ok := x.PodByCgroupIPs(ino(t, ctrA)); !ok || len(ips) != 1 || ips[0] != netip.MustParseAddr("10.244.1.5") {
		t.Errorf("PodByCgroupIPs(container of a) ips = %v, %v; want [10.244.1.5]", ips, ok)
	}

	// A container started after the scan: found after MinRescan, not before
	// (misses do not rescan on every event).
	cidC := strings.Repeat("c3", 32)
	ctrC := mkdir(t, podA, cidC)
	if _, _, ok := x.PodByCgroup(ino(t, ctrC)); ok {
		t.Error("new container resolved without a rescan (the rescan bound is not enforced)")
	}
	now = now.Add(MinRescan)
	if p, c, ok := x.PodByCgroup(ino(t, ctrC)); !ok || p != nn("default", "a") || c != "" {
		t.Errorf("new container after rescan: %v %q %v; want default/a, unnamed container", p, c, ok)
	}
	// Status catches up: the container gets its name without a rescan.
	a2 := a.DeepCopy()
	a2.Status.ContainerStatuses = append(a2.Status.ContainerStatuses, corev1.ContainerStatus{Name: "sidecar", ContainerID: "containerd://" + cidC})
	x.OnUpdate(a, a2)
	if _, c, _ := x.PodByCgroup(ino(t, ctrC)); c != "sidecar" {
		t.Errorf("container name after status update: %q, want sidecar", c)
	}
	// A pod of another node is never resolved by cgroup (its cgroups are
	// not here), and a deleted pod no longer is.
	x.OnDelete(b)
	if _, _, ok := x.PodByCgroup(ino(t, ctrB)); ok {
		t.Error("deleted pod still resolved")
	}
}

func ino(t *testing.T, dir string) uint64 {
	t.Helper()
	i, ok := inode(dir)
	if !ok {
		t.Fatalf("no inode for %s", dir)
	}
	return i
}

func TestSlim(t *testing.T) {
	p := pod("default", "a", "u", "n1", "10.0.0.1")
	p.Annotations = map[string]string{"big": strings.Repeat("x", 1000)}
	p.Spec.Containers = []corev1.Container{{Name: "c", Image: "img"}}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "c", ContainerID: "containerd://x", Image: "img"}}
	o, _ := slim(p)
	s := o.(*corev1.Pod)
	if s.Annotations != nil || s.Spec.Containers != nil || s.Status.ContainerStatuses[0].Image != "" ||
		s.Status.ContainerStatuses[0].ContainerID != "containerd://x" || s.Status.PodIPs[0].IP != "10.0.0.1" || s.UID != "u" {
		t.Errorf("slim kept or lost the wrong fields: %+v", s)
	}
}
