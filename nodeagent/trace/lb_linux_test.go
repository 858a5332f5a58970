//go:build linux

package trace

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/podindex"
)

type svcNames map[uint32][2]string

func (s svcNames) ServicePort(id uint32) (types.NamespacedName, string, bool) {
	n, ok := s[id]
	if !ok {
		return types.NamespacedName{}, "", false
	}
	ns, name, _ := strings.Cut(n[0], "/")
	return types.NamespacedName{Namespace: ns, Name: name}, n[1], true
}

// TestLBReaderEndToEnd: bash in a kubelet-like container cgroup connects to
// a Service address through the real socklb programs; the reader names the
// Service, the backend pod and the client's pod and container in a hub
// subscription.
func TestLBReaderEndToEnd(t *testing.T) {
	bpftest.RequireRoot(t)
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash not found")
	}
	pinDir := bpftest.PinDir(t)
	root := bpftest.Cgroup(t)
	const uid = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
	cid := strings.Repeat("7e", 32)
	podCg := bpftest.SubCgroup(t, root, "pod"+uid)
	ctrCg := bpftest.SubCgroup(t, podCg, cid)

	objs, err := socklb.Load(pinDir, socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64, MaxAffinity: 64, MaxRevNAT: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })
	if err := objs.Attach(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { socklb.DetachPinned(pinDir) })

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
	be := netip.MustParseAddrPort(ln.Addr().String())
	for _, s := range []socklb.Service{
		{ID: 5, Frontends: []socklb.Frontend{{IP: netip.MustParseAddr("10.96.77.1"), Port: 80, Proto: socklb.TCP}},
			Backends: []socklb.Backend{{IP: be.Addr(), Port: be.Port()}}},
		{ID: 6, Frontends: []socklb.Frontend{{IP: netip.MustParseAddr("10.96.77.2"), Port: 80, Proto: socklb.TCP}}},
	} {
		if err := objs.Apply(s); err != nil {
			t.Fatal(err)
		}
	}

	pods := podindex.New("n1", root)
	client := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team", Name: "client", UID: uid},
		Spec: corev1.PodSpec{NodeName: "n1"}, Status: corev1.PodStatus{Phase: corev1.PodRunning,
			PodIPs:            []corev1.PodIP{{IP: "10.244.9.9"}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "app", ContainerID: "containerd://" + cid}}}}
	backend := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-0", UID: "uid-web"},
		Spec: corev1.PodSpec{NodeName: "n2"}, Status: corev1.PodStatus{Phase: corev1.PodRunning,
			PodIPs: []corev1.PodIP{{IP: be.Addr().String()}}}}
	pods.OnAdd(client, true)
	pods.OnAdd(backend, true)

	hub, _ := newHub(t, 100, 100)
	sub := hub.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	r := &LBReader{Events: objs.EventsMap(), Lost: objs.EventsLost, Hub: hub, Node: "n1", Log: slog.Default(),
		Services: svcNames{5: {"default/web", "http"}, 6: {"default/empty", ""}}, Pods: pods, Cgroups: pods}
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reader: %v", err)
		}
	})

	cg, err := os.Open(ctrCg)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	connect := func(dst string) (int, string) {
		cmd := exec.Command("bash", "-c", "exec 3<>/dev/tcp/"+dst+"/80 && read -t 2 l <&3 && echo $l")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
		out, _ := cmd.CombinedOutput()
		return cmd.Process.Pid, string(out)
	}
	next := func() apiv1.TraceEvent {
		t.Helper()
		wctx, wcancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer wcancel()
		l, ok := sub.Next(wctx)
		if !ok || l.Event == nil {
			t.Fatalf("no event within 2s (line %+v)", l)
		}
		return *l.Event
	}
	proc := func(pid int) *apiv1.TraceProcess {
		return &apiv1.TraceProcess{PID: uint32(pid), Command: "bash", CgroupID: bpftest.CgroupID(t, ctrCg), Container: "app"}
	}
	src := apiv1.TracePeer{Namespace: "team", Pod: "client", IP: "10.244.9.9"}

	pid, out := connect("10.96.77.1")
	if strings.TrimSpace(out) != "hi" {
		t.Fatalf("connect through the service: %q", out)
	}
	ev := next()
	ev.Time = time.Time{}
	want := apiv1.TraceEvent{Node: "n1", Type: apiv1.TraceTypeLB, Verdict: apiv1.TraceVerdictTranslated, Protocol: "TCP",
		Source:      src,
		Destination: apiv1.TracePeer{Namespace: "default", Pod: "web-0", IP: be.Addr().String(), Port: be.Port()},
		Service:     &apiv1.TraceService{Namespace: "default", Name: "web", Port: "http", IP: "10.96.77.1", PortNumber: 80},
		Process:     proc(pid)}
	checkEvent(t, ev, want)

	pid, _ = connect("10.96.77.2")
	ev = next()
	ev.Time = time.Time{}
	want = apiv1.TraceEvent{Node: "n1", Type: apiv1.TraceTypeLB, Verdict: apiv1.TraceVerdictRefused, Protocol: "TCP",
		Reason: ReasonNoEndpoints, Source: src,
		Destination: apiv1.TracePeer{IP: "10.96.77.2", Port: 80},
		Service:     &apiv1.TraceService{Namespace: "default", Name: "empty", IP: "10.96.77.2", PortNumber: 80},
		Process:     proc(pid)}
	checkEvent(t, ev, want)
}

func checkEvent(t *testing.T, got, want apiv1.TraceEvent) {
	t.Helper()
	g, w := *got.Service, *want.Service
	gp, wp := *got.Process, *want.Process
	got.Service, want.Service, got.Process, want.Process = nil, nil, nil, nil
	if g != w || gp != wp || !equalEvent(got, want) {
		t.Errorf("event %+v service %+v process %+v\nwant  %+v service %+v process %+v", got, g, gp, want, w, wp)
	}
}

func equalEvent(a, b apiv1.TraceEvent) bool {
	return a.Node == b.Node && a.Type == b.Type && a.Verdict == b.Verdict && a.Protocol == b.Protocol &&
		a.Reason == b.Reason && a.Source == b.Source && a.Destination == b.Destination && a.Message == b.Message
}
