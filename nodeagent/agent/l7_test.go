//go:build linux

package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"math/bits"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	apifake "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/fake"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
)

// TestIntegrationL7Switch toggles the real l7 feature beside service-lb
// (programs on a test cgroup, maps in a private bpffs, the xDS socket in a
// temp dir): enable attaches after the socket LB and serves xDS, service-lb
// switched off and on again keeps steering after the LB, disable leaves no
// pin and no socket.
func TestIntegrationL7Switch(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	t.Cleanup(func() {
		sockmap.DetachPinned(pinDir)
		socklb.DetachPinned(pinDir)
	})
	sock := filepath.Join(t.TempDir(), "envoy", "xds.sock")
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}, Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
		{Type: v1.NodeInternalIP, Address: "127.0.0.9"}}}}
	on := "features:\n  sockstats: false\n  service-lb: true\n  l7: true\n"
	kube := fake.NewClientset(configMap(t, on), node)
	a := startAgent(t, Config{Kube: kube, Client: apifake.NewSimpleClientset(), PinDir: pinDir, CgroupRoot: cgroup,
		ServiceLB: socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64},
		L7:        L7Config{XDSSocket: sock}})

	// connect4 programs in run order at the cgroup.
	connect4 := func() []string {
		out, err := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
		if err != nil {
			t.Fatalf("bpftool cgroup show: %v: %s", err, out)
		}
		var names []string
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) >= 4 && f[1] == "cgroup_inet4_connect" {
				names = append(names, f[len(f)-1])
			}
		}
		return names
	}
	lbThenL7 := []string{"kebpf_connect4", sockmap.SockmapProgKebpfL7Conn4}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	waitFor(t, "l7 active after service-lb", func() bool {
		return slices.Equal(active(a), []string{"service-lb", "l7"}) && slices.Equal(connect4(), lbThenL7) && exists(sock)
	})
	if st := a.State().Status.L7; st == nil || st.EnvoyReady {
		t.Errorf("NodeState l7 %+v: want present, Envoy not ready (no Envoy pod)", st)
	}
	l7RefusalTraced(t, a, pinDir, cgroup)

	// The socket LB detached and attached again lands after steering;
	// the agent must move steering back behind it.
	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: false\n  l7: true\n")
	waitFor(t, "service-lb off", func() bool { return slices.Equal(connect4(), []string{sockmap.SockmapProgKebpfL7Conn4}) })
	setConfigMap(t, kube, on)
	waitFor(t, "steering after the LB again", func() bool { return slices.Equal(connect4(), lbThenL7) })
	if err := sockmap.CheckOrder(cgroup); err != nil {
		t.Error(err)
	}

	setConfigMap(t, kube, "features:\n  sockstats: false\n  service-lb: true\n  l7: false\n")
	waitFor(t, "l7 detached", func() bool {
		return slices.Equal(active(a), []string{"service-lb"}) && slices.Equal(connect4(), []string{"kebpf_connect4"})
	})
	// The maps netpol shares stay pinned, emptied (bpf/sockmap README,
	// shared-map ownership): netpol may hold them; uninstall removes them.
	shared := sockmap.SharedMapPinPaths(pinDir)
	var left []string
	for _, p := range append(sockmap.MapPinPaths(pinDir), sock) {
		if exists(p) && !slices.Contains(shared, p) {
			left = append(left, p)
		}
	}
	for _, p := range shared {
		m, err := ebpf.LoadPinnedMap(p, nil)
		if err != nil {
			t.Errorf("shared map %s: %v", p, err)
			continue
		}
		var k, v []byte
		if m.Type() != ebpf.Array && m.Iterate().Next(&k, &v) {
			t.Errorf("shared map %s not emptied by disable", p)
		}
		m.Close()
	}
	for _, h := range sockmap.Hooks() {
		if p := sockmap.LinkPinPath(pinDir, h); exists(p) {
			left = append(left, p)
		}
	}
	if len(left) > 0 {
		t.Errorf("left after disable l7: %v", left)
	}
	if st := a.State().Status.L7; st != nil {
		t.Errorf("NodeState l7 %+v after disable, want none", st)
	}
}

// l7RefusalTraced: the agent reads the steering datapath's events into its
// trace. With no Envoy ready, a connect to a steered destination is refused
// (fail closed) and the refusal is an l7 event with this process in it.
// The destination is steered by hand (no L7Policy here); only a full
// resync of the l7 sync would take it out again.
func l7RefusalTraced(t *testing.T, a *Agent, pinDir, cgroup string) {
	t.Helper()
	pod, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	port := uint16(pod.Addr().(*net.TCPAddr).Port)
	m, err := ebpf.LoadPinnedMap(filepath.Join(sockmap.MapPinDir(pinDir), sockmap.SockmapMapKebpfL7Dst), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	key := sockmap.SockmapL7Dst{Addr: [4]uint32{binary.LittleEndian.Uint32([]byte{127, 0, 0, 2})}, Port: bits.ReverseBytes16(port), Family: 4}
	if err := m.Update(&key, uint32(1), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	defer m.Delete(&key)
	sub := a.trace.Subscribe(apiv1.TraceQuery{Follow: true, TraceFilter: apiv1.TraceFilter{Types: []string{apiv1.TraceTypeL7}}})
	defer sub.Close()
	bpftest.InCgroup(t, cgroup, func() { _, err = net.DialTimeout("tcp4", pod.Addr().String(), 5*time.Second) })
	if !errors.Is(err, unix.EPERM) {
		t.Fatalf("connect to a steered destination with no Envoy: %v, want EPERM", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, ok := sub.Next(ctx)
	if !ok || l.Event == nil {
		t.Fatalf("no l7 event in the agent's trace: %+v", l)
	}
	e := l.Event
	if e.Verdict != apiv1.TraceVerdictRefused || e.Reason != "no-envoy" || e.Node != "kebpf-node" ||
		e.Destination.IP != "127.0.0.2" || e.Destination.Port != port || e.Process == nil || e.Process.PID != uint32(os.Getpid()) {
		t.Errorf("l7 event %+v process %+v", e, e.Process)
	}
}
