//go:build linux

package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockstats"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/servicelb"
)

// fakeFeature records switches and fails Enable on demand.
type fakeFeature struct {
	name string
	mu   sync.Mutex
	on   bool
	// failEnable makes Enable fail while set.
	failEnable error
	enables    int
	disables   int
	closes     int
}

func (f *fakeFeature) Name() string { return f.name }
func (f *fakeFeature) Enable(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enables++
	if f.failEnable != nil {
		return f.failEnable
	}
	f.on = true
	return nil
}
func (f *fakeFeature) Disable() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disables++
	f.on = false
	return nil
}
func (f *fakeFeature) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closes++
	return nil
}
func (f *fakeFeature) isOn() bool { f.mu.Lock(); defer f.mu.Unlock(); return f.on }

func configMap(t *testing.T, data string) *v1.ConfigMap {
	t.Helper()
	return &v1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: manifests.Namespace, Name: manifests.ConfigMapName},
		Data:       map[string]string{apiv1.ConfigKey: data},
	}
}

func setConfigMap(t *testing.T, kube kubernetes.Interface, data string) {
	t.Helper()
	cms := kube.CoreV1().ConfigMaps(manifests.Namespace)
	if _, err := cms.Update(context.Background(), configMap(t, data), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// startAgent runs an agent without NodeState publishing against kube.
func startAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	if cfg.NodeName == "" {
		cfg.NodeName = "kebpf-node"
	}
	cfg.Version = "test"
	cfg.Log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Retry = 50 * time.Millisecond
	cfg.Heartbeat = time.Hour
	if cfg.Listener == nil {
		cfg.HealthAddr = "127.0.0.1:0"
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return a
}

func active(a *Agent) []string { return a.State().Status.Active }

func errorsContain(a *Agent, sub string) bool {
	for _, e := range a.State().Status.Errors {
		if strings.Contains(e, sub) {
			return true
		}
	}
	return false
}

func TestFeatureSwitchFollowsConfigMap(t *testing.T) {
	bpftest.RequireRoot(t) // Run probes the kernel
	kube := fake.NewClientset(configMap(t, "features:\n  sockstats: true\n  service-lb: false\n"))
	ss, lb := &fakeFeature{name: "sockstats"}, &fakeFeature{name: "service-lb"}
	a := startAgent(t, Config{Kube: kube, Features: []Feature{ss, lb}, CgroupRoot: bpftest.Cgroup(t), PinDir: bpftest.PinDir(t)})

	waitFor(t, "sockstats active", func() bool { return slices.Equal(active(a), []string{"sockstats"}) })
	if lb.isOn() {
		t.Error("service-lb enabled although the config disables it")
	}

	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: true\n")
	waitFor(t, "switch to service-lb", func() bool { return slices.Equal(active(a), []string{"service-lb"}) })
	if ss.isOn() || !lb.isOn() {
		t.Errorf("after switch sockstats on=%v service-lb on=%v", ss.isOn(), lb.isOn())
	}

	// An invalid config keeps everything as it is and says why.
	setConfigMap(t, kube, "features:\n  sockstat: true\n")
	waitFor(t, "config error reported", func() bool { return errorsContain(a, "unknown feature(s) sockstat") })
	if !slices.Equal(active(a), []string{"service-lb"}) || a.State().Status.Ready {
		t.Errorf("after invalid config: active %v ready %v", active(a), a.State().Status.Ready)
	}

	// Enable failures are reported and retried until they succeed.
	ss.mu.Lock()
	ss.failEnable = errors.New("injected attach failure")
	ss.mu.Unlock()
	setConfigMap(t, kube, "features:\n  sockstats: true\n  service-lb: true\n")
	waitFor(t, "enable failure reported", func() bool { return errorsContain(a, "sockstats: injected attach failure") })
	if ok, why := a.Ready(); ok || !strings.Contains(why, "injected attach failure") {
		t.Errorf("Ready = %v %q, want not ready naming the failure", ok, why)
	}
	ss.mu.Lock()
	n := ss.enables
	ss.failEnable = nil
	ss.mu.Unlock()
	waitFor(t, "retry succeeds", func() bool { return slices.Equal(active(a), []string{"sockstats", "service-lb"}) })
	ss.mu.Lock()
	if ss.enables <= n {
		t.Errorf("enables = %d, want a retry after %d", ss.enables, n)
	}
	ss.mu.Unlock()
	if errs := a.State().Status.Errors; len(errs) != 0 {
		t.Errorf("errors after recovery = %q", errs)
	}

	// Deleting the ConfigMap keeps the features.
	if err := kube.CoreV1().ConfigMaps(manifests.Namespace).Delete(context.Background(), manifests.ConfigMapName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "delete reported", func() bool { return errorsContain(a, "deleted; keeping the current features") })
	if !slices.Equal(active(a), []string{"sockstats", "service-lb"}) {
		t.Errorf("after delete active = %v", active(a))
	}
}

func TestFeatureMissingConfigMapMeansDefaults(t *testing.T) {
	bpftest.RequireRoot(t)
	kube := fake.NewClientset()
	ss, lb := &fakeFeature{name: "sockstats"}, &fakeFeature{name: "service-lb"}
	a := startAgent(t, Config{Kube: kube, Features: []Feature{ss, lb}, CgroupRoot: bpftest.Cgroup(t), PinDir: bpftest.PinDir(t)})
	waitFor(t, "defaults active", func() bool { return slices.Equal(active(a), []string{"sockstats", "service-lb"}) })
	if !errorsContain(a, "not found; using the defaults") {
		t.Errorf("errors = %q, want the missing ConfigMap reported", a.State().Status.Errors)
	}
}

// TestIntegrationSockstatsSwitch toggles the real sockstats feature through
// the ConfigMap: disable leaves no link, map or pin; enable attaches again;
// agent exit leaves it attached.
func TestIntegrationSockstatsSwitch(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	t.Cleanup(func() {
		sockstats.DetachPinned(pinDir)
		os.Remove(sockstats.MapPinPath(pinDir))
	})
	kube := fake.NewClientset(configMap(t, "features:\n  sockstats: true\n  service-lb: false\n"))
	attached := func() bool {
		out, _ := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
		return strings.Contains(string(out), sockstats.ProgramName)
	}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	ctx, cancel := context.WithCancel(context.Background())
	a, err := New(Config{NodeName: "kebpf-node", PinDir: pinDir, CgroupRoot: cgroup, Version: "test", Kube: kube,
		HealthAddr: "127.0.0.1:0", Retry: 50 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stop := func() { cancel(); <-done; done <- nil }
	t.Cleanup(stop)

	waitFor(t, "sockstats attached", func() bool { return slices.Equal(active(a), []string{"sockstats"}) && attached() })

	start := time.Now()
	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: false\n")
	waitFor(t, "sockstats detached", func() bool { return len(active(a)) == 0 && !attached() })
	t.Logf("disable took %s", time.Since(start))
	if exists(sockstats.LinkPinPath(pinDir)) || exists(sockstats.MapPinPath(pinDir)) {
		t.Error("pins left after disable")
	}

	setConfigMap(t, kube, "features:\n  sockstats: true\n  service-lb: false\n")
	waitFor(t, "sockstats attached again", func() bool { return slices.Equal(active(a), []string{"sockstats"}) && attached() })
	if !exists(sockstats.LinkPinPath(pinDir)) || !exists(sockstats.MapPinPath(pinDir)) {
		t.Error("pins missing after enable")
	}

	stop()
	if !attached() {
		t.Error("agent exit detached sockstats; it must stay attached via its pin")
	}
}

// TestIntegrationServiceLBSwitch toggles the real service-lb feature (socklb
// programs on a test cgroup, maps in a private bpffs, Services from a fake
// clientset): enable attaches and programs, disable leaves nothing.
func TestIntegrationServiceLBSwitch(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	t.Cleanup(func() { socklb.DetachPinned(pinDir) })
	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"}, Spec: v1.ServiceSpec{
		Type: v1.ServiceTypeClusterIP, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
		Ports: []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}}}}
	kube := fake.NewClientset(configMap(t, "features:\n  sockstats: false\n  service-lb: true\n"), svc,
		&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}})
	var synced atomic.Int32
	a := startAgent(t, Config{Kube: kube, PinDir: pinDir, CgroupRoot: cgroup,
		ServiceLB: socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64},
		OnServiceSync: func(r servicelb.SyncResult) {
			if r.Err == nil && r.Applied > 0 {
				synced.Add(1)
			}
		}})
	attached := func() bool {
		out, _ := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
		return strings.Contains(string(out), "kebpf_connect4")
	}
	pins := func() []string {
		var left []string
		for _, p := range socklb.MapPinPaths(pinDir) {
			if _, err := os.Stat(p); err == nil {
				left = append(left, p)
			}
		}
		for _, h := range socklb.Hooks() {
			if _, err := os.Stat(socklb.LinkPinPath(pinDir, h)); err == nil {
				left = append(left, socklb.LinkPinPath(pinDir, h))
			}
		}
		return left
	}

	waitFor(t, "service-lb active and programmed", func() bool {
		return slices.Equal(active(a), []string{"service-lb"}) && attached() && synced.Load() > 0
	})
	if len(pins()) == 0 {
		t.Error("no pins while enabled")
	}

	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: false\n")
	waitFor(t, "service-lb detached", func() bool { return len(active(a)) == 0 && !attached() })
	if left := pins(); len(left) != 0 {
		t.Errorf("pins left after disable: %v", left)
	}

	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: true\n")
	waitFor(t, "service-lb attached again", func() bool { return slices.Equal(active(a), []string{"service-lb"}) && attached() })
}

// TestDestroyNetnsIncludesTheNode: UDP sockets of the node's own network
// namespace (hostNetwork pods, node processes) are swept too, not only the
// pods' namespaces under NetnsDir.
func TestDestroyNetnsIncludesTheNode(t *testing.T) {
	got := podNetns()
	if len(got) == 0 || got[0] != "" {
		t.Fatalf("podNetns() = %q, want the agent's own namespace (\"\") first", got)
	}
	for _, p := range got[1:] {
		if !strings.HasPrefix(p, NetnsDir+"/") {
			t.Errorf("podNetns() lists %q, outside %s", p, NetnsDir)
		}
	}
}
