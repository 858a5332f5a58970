//go:build linux

package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	apifake "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/fake"
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
