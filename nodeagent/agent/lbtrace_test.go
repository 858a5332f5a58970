//go:build linux

package agent

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// TestIntegrationServiceLBTrace runs the whole agent with service-lb on a
// test cgroup: bash, in a kubelet-like container cgroup of a pod the fake
// API server lists, connects to a ClusterIP; the agent's trace names the
// Service and port (from the service sync), the backend pod (pod index by
// IP) and the client pod and container (pod index by cgroup).
func TestIntegrationServiceLBTrace(t *testing.T) {
	bpftest.RequireRoot(t)
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash not found")
	}
	pinDir := bpftest.PinDir(t)
	root := bpftest.Cgroup(t)
	t.Cleanup(func() { socklb.DetachPinned(pinDir) })
	const uid = "3c9d8e7f-6a5b-4c3d-9e8f-7a6b5c4d3e2f"
	cid := strings.Repeat("c0", 32)
	qos := bpftest.SubCgroup(t, root, "kubepods")
	podCg := bpftest.SubCgroup(t, qos, "pod"+uid)
	ctrCg := bpftest.SubCgroup(t, podCg, cid)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi\n"))
			c.Close()
		}
	}()
	port := int32(ln.Addr().(*net.TCPAddr).Port)

	svc := &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"}, Spec: v1.ServiceSpec{
		Type: v1.ServiceTypeClusterIP, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
		Ports: []v1.ServicePort{{Name: "http", Port: 80, Protocol: v1.ProtocolTCP}}}}
	slice := &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "web-1", Labels: map[string]string{discovery.LabelServiceName: "web"}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Protocol: ptr.To(v1.ProtocolTCP), Port: ptr.To(port)}},
		Endpoints: []discovery.Endpoint{{Addresses: []string{"127.0.0.1"}, NodeName: ptr.To("other"),
			Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}}},
	}
	client := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: "client", UID: uid},
		Spec: v1.PodSpec{NodeName: "kebpf-node"}, Status: v1.PodStatus{Phase: v1.PodRunning,
			PodIPs:            []v1.PodIP{{IP: "10.244.0.9"}},
			ContainerStatuses: []v1.ContainerStatus{{Name: "app", ContainerID: "containerd://" + cid}}}}
	backend := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-0", UID: "uid-web-0"},
		Spec: v1.PodSpec{NodeName: "other"}, Status: v1.PodStatus{Phase: v1.PodRunning, PodIPs: []v1.PodIP{{IP: "127.0.0.1"}}}}
	kube := fake.NewClientset(configMap(t, "features:\n  sockstats: false\n  service-lb: true\n"), svc, slice, client, backend,
		&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}})
	a := startAgent(t, Config{Kube: kube, PinDir: pinDir, CgroupRoot: root,
		ServiceLB: socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64}})

	sub := a.trace.Subscribe(apiv1.TraceQuery{Follow: true, TraceFilter: apiv1.TraceFilter{Types: []string{apiv1.TraceTypeLB}}})
	defer sub.Close()
	cg, err := os.Open(ctrCg)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()

	// Retried until the sync has programmed the Service and the pod
	// informer has the pods: each try is one connect, one event.
	var last apiv1.TraceEvent
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		cmd := exec.Command("bash", "-c", "exec 3<>/dev/tcp/10.96.0.10/80 && read -t 2 l <&3 && echo $l")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
		out, _ := cmd.CombinedOutput()
		if strings.TrimSpace(string(out)) != "hi" {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		l, ok := sub.Next(ctx)
		cancel()
		if !ok || l.Event == nil {
			t.Fatalf("translated connect, but no lb event within 2s (%+v)", l)
		}
		last = *l.Event
		if last.Service.Name != "" && last.Source.Pod != "" && last.Destination.Pod != "" {
			break
		}
	}
	want := apiv1.TraceService{Namespace: "shop", Name: "web", Port: "http", IP: "10.96.0.10", PortNumber: 80}
	if last.Service == nil || *last.Service != want {
		t.Fatalf("service %+v, want %+v (event %+v)", last.Service, want, last)
	}
	if last.Verdict != apiv1.TraceVerdictTranslated || last.Node != "kebpf-node" ||
		last.Source != (apiv1.TracePeer{Namespace: "team", Pod: "client", IP: "10.244.0.9"}) ||
		last.Destination != (apiv1.TracePeer{Namespace: "shop", Pod: "web-0", IP: "127.0.0.1", Port: uint16(port)}) {
		t.Errorf("event %+v", last)
	}
	if p := last.Process; p == nil || p.Command != "bash" || p.PID == 0 || p.Container != "app" || p.CgroupID != bpftest.CgroupID(t, ctrCg) {
		t.Errorf("process %+v", last.Process)
	}
}

// TestIntegrationLBTraceFlagOff: --lb-trace=false writes the pinned switch
// off when service-lb is enabled (and it stays written for the programs).
func TestIntegrationLBTraceFlagOff(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	root := bpftest.Cgroup(t)
	t.Cleanup(func() { socklb.DetachPinned(pinDir) })
	kube := fake.NewClientset(configMap(t, "features:\n  sockstats: false\n  service-lb: true\n"),
		&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "kebpf-node"}})
	a := startAgent(t, Config{Kube: kube, PinDir: pinDir, CgroupRoot: root, LBTraceOff: true,
		ServiceLB: socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64}})
	waitFor(t, "service-lb active", func() bool { return len(active(a)) == 1 })
	m, err := ebpf.LoadPinnedMap(filepath.Join(socklb.MapPinDir(pinDir), socklb.SocklbMapKebpfLbCfg), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var c socklb.SocklbLbCfg
	if err := m.Lookup(uint32(0), &c); err != nil {
		t.Fatal(err)
	}
	if c.TraceOff != 1 {
		t.Errorf("kebpf_lb_cfg trace_off = %d with LBTraceOff, want 1", c.TraceOff)
	}
}
