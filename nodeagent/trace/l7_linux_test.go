//go:build linux

package trace

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
)

type podsByIP map[netip.Addr]types.NamespacedName

func (p podsByIP) PodByIP(ip netip.Addr) (types.NamespacedName, bool) { k, ok := p[ip]; return k, ok }

func TestL7ConnectEvent(t *testing.T) {
	pods := podsByIP{netip.MustParseAddr("10.0.0.2"): {Namespace: "shop", Name: "api"}}
	ev := sockmap.Event{Verdict: sockmap.EventSteered, TGID: 42, Comm: "curl", CgroupID: 7,
		Dst: netip.MustParseAddrPort("10.0.0.2:8080")}
	got := L7ConnectEvent(ev, "n1", epoch, pods, nil)
	if got.Type != apiv1.TraceTypeL7 || got.Verdict != apiv1.TraceVerdictRedirected || got.Reason != "" ||
		got.Destination != (apiv1.TracePeer{Namespace: "shop", Pod: "api", IP: "10.0.0.2", Port: 8080}) ||
		got.Source != (apiv1.TracePeer{}) || *got.Process != (apiv1.TraceProcess{PID: 42, Command: "curl", CgroupID: 7}) ||
		got.Node != "n1" || !got.Time.Equal(epoch) || got.Protocol != "TCP" {
		t.Errorf("steered: %+v %+v", got, got.Process)
	}
	ev.Verdict, ev.Src = sockmap.EventNoEnvoy, netip.MustParseAddrPort("10.0.0.9:5000")
	got = L7ConnectEvent(ev, "n1", epoch, nil, nil) // no namer: IPs only
	if got.Verdict != apiv1.TraceVerdictRefused || got.Reason != L7ReasonNoEnvoy ||
		got.Destination != (apiv1.TracePeer{IP: "10.0.0.2", Port: 8080}) || got.Source != (apiv1.TracePeer{IP: "10.0.0.9", Port: 5000}) {
		t.Errorf("refused: %+v", got)
	}
}

// TestL7Reader: the real steering programs in a test cgroup steer one
// connect() of this process to a stand-in Envoy and refuse one when Envoy
// is gone; the agent's reader turns each into one l7 event naming the
// destination pod and this process.
func TestL7Reader(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir, cg := bpftest.PinDir(t), bpftest.Cgroup(t)
	app, envoy := bpftest.SubCgroup(t, cg, "app"), bpftest.SubCgroup(t, cg, "envoy")
	o, err := sockmap.Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	if err := o.Attach(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sockmap.DetachPinned(pinDir); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	pod, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pod.Close() })
	var envoyLn net.Listener
	bpftest.InCgroup(t, envoy, func() { envoyLn, err = net.Listen("tcp4", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { envoyLn.Close() })
	podAddr := pod.Addr().(*net.TCPAddr).AddrPort()
	if err := o.AddEnvoyCgroup(bpftest.CgroupID(t, envoy)); err != nil {
		t.Fatal(err)
	}
	if err := o.SetEnvoy(sockmap.Envoy{Listener: envoyLn.Addr().(*net.TCPAddr).AddrPort()}); err != nil {
		t.Fatal(err)
	}
	if err := o.SetSteered(podAddr); err != nil {
		t.Fatal(err)
	}

	h, _ := newHub(t, 100, 100)
	sub := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	r := &L7Reader{Events: o.EventsMap(), Lost: o.EventsLost, Hub: h, Node: "n1", Log: slog.Default(),
		Pods: podsByIP{netip.MustParseAddr("127.0.0.2"): {Namespace: "shop", Name: "api"}}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reader: %v", err)
		}
	})

	dial := func() error {
		var err error
		bpftest.InCgroup(t, app, func() {
			var c net.Conn
			if c, err = net.DialTimeout("tcp4", podAddr.String(), 5*time.Second); err == nil {
				c.Close()
			}
		})
		return err
	}
	if err := dial(); err != nil {
		t.Fatal(err)
	}
	if err := o.SetEnvoy(sockmap.Envoy{}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); !errors.Is(err, unix.EPERM) {
		t.Fatalf("connect with no Envoy: %v, want EPERM", err)
	}

	comm, _ := os.ReadFile("/proc/self/comm")
	want := apiv1.TraceProcess{PID: uint32(os.Getpid()), Command: strings.TrimSpace(string(comm)), CgroupID: bpftest.CgroupID(t, app)}
	wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer wcancel()
	for i, verdict := range []string{apiv1.TraceVerdictRedirected, apiv1.TraceVerdictRefused} {
		l, ok := sub.Next(wctx)
		if !ok || l.Event == nil {
			t.Fatalf("event %d: %+v (%v)", i, l, ok)
		}
		e := l.Event
		t.Logf("event %d: %s %s %+v %+v %q", i, e.Verdict, e.Reason, e.Destination, *e.Process, e.Message)
		if e.Type != apiv1.TraceTypeL7 || e.Verdict != verdict || e.Node != "n1" ||
			e.Destination != (apiv1.TracePeer{Namespace: "shop", Pod: "api", IP: "127.0.0.2", Port: podAddr.Port()}) ||
			e.Process == nil || *e.Process != want || time.Since(e.Time).Abs() > time.Minute {
			t.Errorf("event %d: %+v, process %+v, want %s naming shop/api and %+v", i, e, e.Process, verdict, want)
		}
	}
	qctx, qcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer qcancel()
	if l, ok := sub.Next(qctx); ok {
		t.Errorf("a third line: %+v %+v", l.Event, l.Lost)
	}
}
