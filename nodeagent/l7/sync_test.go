package l7

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	kfake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	apifake "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/fake"
	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// fakeDatapath records what the sync programs (the real maps are proven
// by bpf/sockmap's root tests and the e2e suite).
type fakeDatapath struct {
	mu       sync.Mutex
	steered  map[netip.AddrPort]bool
	listener netip.AddrPort
	cgroups  map[uint64]bool
}

func newFakeDatapath() *fakeDatapath {
	return &fakeDatapath{steered: map[netip.AddrPort]bool{}, cgroups: map[uint64]bool{}}
}

func (d *fakeDatapath) SetSteered(a netip.AddrPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.steered[a] = true
	return nil
}

func (d *fakeDatapath) DeleteSteered(a netip.AddrPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.steered, a)
	return nil
}

func (d *fakeDatapath) Steered() ([]netip.AddrPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []netip.AddrPort
	for a := range d.steered {
		out = append(out, a)
	}
	return out, nil
}

func (d *fakeDatapath) SetEnvoyListener(l netip.AddrPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.listener = l
	return nil
}

func (d *fakeDatapath) AddEnvoyCgroup(id uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cgroups[id] = true
	return nil
}

func (d *fakeDatapath) DeleteEnvoyCgroup(id uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.cgroups, id)
	return nil
}

func (d *fakeDatapath) state() (steered []netip.AddrPort, listener netip.AddrPort, cgroups []uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for a := range d.steered {
		steered = append(steered, a)
	}
	slices.SortFunc(steered, func(a, b netip.AddrPort) int { return a.Compare(b) })
	for id := range d.cgroups {
		cgroups = append(cgroups, id)
	}
	return steered, d.listener, cgroups
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func appPod(name, node, ip string, lbl map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, Labels: lbl, UID: types.UID("uid-" + name)},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
}

func envoyPod(uid string, ready bool) *corev1.Pod {
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: manifests.Namespace, Name: "kebpf-envoy-x", UID: types.UID(uid),
			Labels: map[string]string{manifests.LabelName: manifests.EnvoyDaemonSetName}},
		Spec: corev1.PodSpec{NodeName: "node-a", HostNetwork: true},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "172.18.0.2",
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: st}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "envoy", Ready: ready}}},
	}
}

// Envoy is ready when the kubelet says its containers are, whatever the
// pod's Ready condition, which the node lifecycle controller turns False
// on a node it has not heard from (after an API server outage).
func TestPodReadyFollowsTheKubelet(t *testing.T) {
	marked := envoyPod("u", true)
	marked.Status.Conditions[0].Status = corev1.ConditionFalse
	notYet := envoyPod("u", false)
	none := envoyPod("u", true)
	none.Status.ContainerStatuses = nil
	deleting := envoyPod("u", true)
	deleting.DeletionTimestamp = &metav1.Time{}
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
		want bool
	}{
		{"ready", envoyPod("u", true), true},
		{"marked not ready by the node controller, container ready", marked, true},
		{"container not ready", notYet, false},
		{"no container status yet", none, false},
		// It drains beside its replacement, still accepting.
		{"being deleted, container ready", deleting, true},
	} {
		if got := podReady(tc.pod); got != tc.want {
			t.Errorf("%s: podReady = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func shopPolicy(name string, port int32, prefix string) *v1alpha1.L7Policy {
	return &v1alpha1.L7Policy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, Generation: 1},
		Spec: v1alpha1.L7PolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Ports:       []v1alpha1.L7PolicyPort{{Port: port}},
			Rules:       []v1alpha1.HTTPRule{{Path: &v1alpha1.HTTPPathMatch{Prefix: &prefix}}},
		},
	}
}

type harness struct {
	kube   *kfake.Clientset
	api    *apifake.Clientset
	dp     *fakeDatapath
	syncer *Syncer
	cgRoot string
}

func start(t *testing.T, kubeObjs []runtime.Object, policies ...runtime.Object) *harness {
	t.Helper()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: "172.18.0.2"}}}}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}
	h := &harness{
		kube:   kfake.NewClientset(append([]runtime.Object{node, ns}, kubeObjs...)...),
		api:    apifake.NewSimpleClientset(policies...),
		dp:     newFakeDatapath(),
		cgRoot: t.TempDir(),
	}
	ctx, cancel := context.WithCancel(context.Background())
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	srv := xds.NewServer(ctx, xds.ServerOptions{Logger: log})
	s, err := New(Options{
		Base: apisync.Base{Client: h.kube, NodeName: "node-a", Recorder: record.NewFakeRecorder(100), Log: log,
			Intervals: apisync.Intervals{Retry: 20 * time.Millisecond}},
		API: h.api, Datapath: h.dp, Server: srv, Namespace: manifests.Namespace, CgroupRoot: h.cgRoot,
	})
	if err != nil {
		t.Fatal(err)
	}
	h.syncer = s
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return h
}

// podCgroupDir makes the cgroup directory kubelet would make for uid.
func (h *harness) podCgroupDir(t *testing.T, uid string) uint64 {
	t.Helper()
	dir := filepath.Join(h.cgRoot, "kubepods", "besteffort", "pod"+uid, "ctr1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := cgroupID(filepath.Dir(dir))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (h *harness) policy(t *testing.T, name string) *v1alpha1.L7Policy {
	t.Helper()
	p, err := h.api.EbpfV1alpha1().L7Policies("shop").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSyncSteersLocalSelectedPods(t *testing.T) {
	api := map[string]string{"app": "api"}
	h := start(t, []runtime.Object{
		appPod("api-local", "node-a", "10.244.0.5", api),
		appPod("api-remote", "node-b", "10.244.1.5", api),
		appPod("web", "node-a", "10.244.0.6", map[string]string{"app": "web"}),
	}, shopPolicy("api", 8080, "/public/"))

	// Local selected pod:port only (the destination's node enforces);
	// no Envoy pod yet: steering stays off (connects fail closed).
	want := []netip.AddrPort{netip.MustParseAddrPort("10.244.0.5:8080")}
	eventually(t, "local destination steered", func() bool {
		steered, _, _ := h.dp.state()
		return slices.Equal(steered, want)
	})
	if _, l, _ := h.dp.state(); l.IsValid() {
		t.Errorf("envoy listener %s without an Envoy pod", l)
	}
	eventually(t, "Accepted and NoDestinations... then node entry", func() bool {
		p := h.policy(t, "api")
		acc := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.L7ConditionAccepted)
		return acc != nil && acc.Status == metav1.ConditionTrue && len(p.Status.Nodes) == 1 && p.Status.Nodes[0].Node == "node-a"
	})
	if st := h.syncer.Status(); st.Steered != 1 || st.Policies != 1 || st.EnvoyReady || st.Version == "" {
		t.Errorf("node status %+v", st)
	}

	// The Envoy pod appears, not ready: its cgroup is registered first,
	// steering still off; ready: steering on to node IP:15001.
	id := h.podCgroupDir(t, "envoy-uid")
	ctx := context.Background()
	if _, err := h.kube.CoreV1().Pods(manifests.Namespace).Create(ctx, envoyPod("envoy-uid", false), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "envoy cgroup registered", func() bool {
		_, _, cgs := h.dp.state()
		return slices.Equal(cgs, []uint64{id})
	})
	if _, l, _ := h.dp.state(); l.IsValid() {
		t.Errorf("steering on (%s) while Envoy is not ready", l)
	}
	if _, err := h.kube.CoreV1().Pods(manifests.Namespace).UpdateStatus(ctx, envoyPod("envoy-uid", true), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "steering on", func() bool {
		_, l, _ := h.dp.state()
		return l == netip.MustParseAddrPort("172.18.0.2:15001")
	})
	eventually(t, "node status envoy ready", func() bool { return h.syncer.Status().EnvoyReady })

	// A second policy on another port, an invalid one, a label change.
	if _, err := h.api.EbpfV1alpha1().L7Policies("shop").Create(ctx, shopPolicy("admin", 9090, "/admin/"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	bad := shopPolicy("bad", 7070, "/")
	re := "([a-z"
	bad.Spec.Rules[0].Path = &v1alpha1.HTTPPathMatch{Regex: &re}
	if _, err := h.api.EbpfV1alpha1().L7Policies("shop").Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want = []netip.AddrPort{netip.MustParseAddrPort("10.244.0.5:8080"), netip.MustParseAddrPort("10.244.0.5:9090")}
	eventually(t, "second port steered, invalid policy's not", func() bool {
		steered, _, _ := h.dp.state()
		return slices.Equal(steered, want)
	})
	eventually(t, "invalid policy Accepted=False", func() bool {
		c := meta.FindStatusCondition(h.policy(t, "bad").Status.Conditions, v1alpha1.L7ConditionAccepted)
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == v1alpha1.L7ReasonInvalid
	})

	// The Envoy pod goes away: steering off (fail closed), destinations kept.
	if err := h.kube.CoreV1().Pods(manifests.Namespace).Delete(ctx, "kebpf-envoy-x", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "steering off without Envoy", func() bool {
		steered, l, _ := h.dp.state()
		return !l.IsValid() && len(steered) == 2
	})

	// Policies deleted: nothing steered.
	for _, n := range []string{"api", "admin", "bad"} {
		if err := h.api.EbpfV1alpha1().L7Policies("shop").Delete(ctx, n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "nothing steered", func() bool {
		steered, _, _ := h.dp.state()
		return len(steered) == 0
	})
}

func TestPodCgroup(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{
		"kubepods/burstable/pod1111-22/ctr",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3333_44.slice/cri-containerd-x.scope",
		"a/b/c/d/e/f/g/pod5555",
	} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for uid, want := range map[string]string{
		"1111-22": "kubepods/burstable/pod1111-22",
		"3333-44": "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3333_44.slice",
	} {
		got, err := podCgroup(root, uid)
		if err != nil || got != filepath.Join(root, want) {
			t.Errorf("podCgroup(%s) = %q, %v; want %q", uid, got, err, want)
		}
	}
	if got, err := podCgroup(root, "5555"); err == nil {
		t.Errorf("found %q beyond the depth limit", got)
	}
	if _, err := podCgroup(root, "nope"); err == nil {
		t.Error("found a pod that does not exist")
	}
}

func TestNodeListener(t *testing.T) {
	n := &corev1.Node{Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
		{Type: corev1.NodeHostName, Address: "node-a"},
		{Type: corev1.NodeInternalIP, Address: "fd00::2"},
		{Type: corev1.NodeInternalIP, Address: "172.18.0.2"},
	}}}
	if got, ok := nodeListener(n, 15001); !ok || got != netip.MustParseAddrPort("172.18.0.2:15001") {
		t.Errorf("nodeListener = %s %v", got, ok)
	}
	if _, ok := nodeListener(&corev1.Node{}, 15001); ok {
		t.Error("listener without addresses")
	}
}

func TestXDSPod(t *testing.T) {
	p := appPod("a", "n", "10.0.0.1", nil)
	p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: "fd00::1"})
	got, ok := xdsPod(p)
	if !ok || len(got.IPs) != 2 {
		t.Errorf("xdsPod = %+v %v", got, ok)
	}
	p.Status.Phase = corev1.PodSucceeded
	if _, ok := xdsPod(p); ok {
		t.Error("terminal pod kept: its IP may belong to another pod now")
	}
	if _, ok := xdsPod(&corev1.Pod{}); ok {
		t.Error("pod without IPs kept")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(b))
	return len(b), nil
}
