//go:build linux

package l7

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

type podsByIP map[netip.Addr]types.NamespacedName

func (p podsByIP) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	k, ok := p[ip.Unmap()]
	return k, ok
}

// TestIntegrationTraceEvents: the agent's two l7 trace sources on the real
// path. A client in the app cgroup makes an allowed GET and a denied one to
// the pod; the datapath steers both connects to a real Envoy, which decides
// and reports each request over gRPC ALS on the xDS socket. The trace gets
// exactly one "redirected" event per connect (this process, the pod) and
// one request event per request: method, path, status, verdict and the
// L7Policy (with the rule that allowed).
func TestIntegrationTraceEvents(t *testing.T) {
	p := startPath(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		fmt.Fprintf(w, "pod %s %s", req.Method, req.URL.Path)
	}), func(pod netip.AddrPort) xds.Input { return Input(pod, "n1", "/public/") })

	// The client's sockets are not bound: Envoy sees them from 127.0.0.1.
	pods := podsByIP{p.pod.Addr(): {Namespace: "shop", Name: "api"}, netip.MustParseAddr("127.0.0.1"): {Namespace: "shop", Name: "web"}}
	hub, err := trace.NewHub(trace.Options{Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	p.ctl.SetAccessLog(func(_ string, e *alsdata.HTTPAccessLogEntry) { hub.Publish(trace.L7RequestEvent(e, "n1", pods)) })
	r := &trace.L7Reader{Events: p.dp.EventsMap(), Lost: p.dp.EventsLost, Hub: hub, Node: "n1", Pods: pods, Log: slog.Default()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("reader: %v", err)
		}
	})
	// startPath's own probe request is read (ring) and reported (ALS,
	// flushed every 100 ms) before the stream opens: only new events count.
	time.Sleep(time.Second)
	sub := hub.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()

	client := p.client(t, false, false) // one connection per request
	for path, want := range map[string]int{"/public/index.html": 200, "/private": 403} {
		resp, err := client.Get(p.url(path))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}

	var connects, requests []apiv1.TraceEvent
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	for len(connects) < 2 || len(requests) < 2 {
		l, ok := sub.Next(wctx)
		if !ok {
			t.Fatalf("after 10s: %d connect and %d request events, want 2 and 2", len(connects), len(requests))
		}
		if l.Lost != nil {
			t.Fatalf("lost: %+v", l.Lost)
		}
		if l.Event.HTTP != nil {
			requests = append(requests, *l.Event)
		} else {
			connects = append(connects, *l.Event)
		}
	}
	// Nothing more: exactly one event per connect and per request.
	qctx, qcancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer qcancel()
	if l, ok := sub.Next(qctx); ok {
		t.Errorf("an extra line: %+v %+v", l.Event, l.Lost)
	}

	comm, _ := os.ReadFile("/proc/self/comm")
	for i, e := range connects {
		t.Logf("connect %d: %s -> %s/%s %s:%d process %+v", i, e.Verdict, e.Destination.Namespace, e.Destination.Pod, e.Destination.IP, e.Destination.Port, *e.Process)
		if e.Type != apiv1.TraceTypeL7 || e.Verdict != apiv1.TraceVerdictRedirected || e.Destination.Pod != "api" ||
			e.Destination.Port != p.pod.Port() || e.Process.PID != uint32(os.Getpid()) ||
			e.Process.Command != strings.TrimSpace(string(comm)) || e.Process.CgroupID == 0 {
			t.Errorf("connect event %d: %+v %+v", i, e, e.Process)
		}
	}
	byPath := map[string]apiv1.TraceEvent{}
	for _, e := range requests {
		b := e.HTTP
		t.Logf("request: %s %s %s%s -> %d %s reason %s policy %+v (%s/%s -> %s/%s) %q", e.Verdict, b.Method, b.Authority, b.Path, b.Status,
			e.Type, e.Reason, e.Policy, e.Source.Namespace, e.Source.Pod, e.Destination.Namespace, e.Destination.Pod, e.Message)
		byPath[e.HTTP.Path] = e
	}
	ok := byPath["/public/index.html"]
	if ok.Verdict != apiv1.TraceVerdictAllowed || ok.HTTP.Method != "GET" || ok.HTTP.Status != 200 || ok.HTTP.Authority != p.pod.String() ||
		ok.Policy == nil || ok.Policy.Kind != "L7Policy" || ok.Policy.Namespace != "shop" || ok.Policy.Name != "api" ||
		ok.Policy.Rule == nil || *ok.Policy.Rule != 0 || ok.Source.Pod != "web" || ok.Destination.Pod != "api" ||
		ok.Destination.Port != p.pod.Port() {
		t.Errorf("allowed request: %+v http %+v policy %+v", ok, ok.HTTP, ok.Policy)
	}
	no := byPath["/private"]
	if no.Verdict != apiv1.TraceVerdictDenied || no.HTTP.Method != "GET" || no.HTTP.Status != 403 ||
		no.Reason != apiv1.TraceReasonDefaultDeny || no.Policy == nil || no.Policy.Name != "api" || no.Policy.Namespace != "shop" ||
		no.Policy.Rule != nil || no.Destination.Pod != "api" || !strings.Contains(no.Message, "shop/api") {
		t.Errorf("denied request: %+v http %+v policy %+v", no, no.HTTP, no.Policy)
	}
	// Envoy's own count of ALS entries it could not send (buffer full or
	// stream down): visible on its admin API only.
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	written, dropped := p.envoy.Stat(sctx, "access_logs.grpc_access_log.logs_written"), p.envoy.Stat(sctx, "access_logs.grpc_access_log.logs_dropped")
	t.Logf("envoy ALS: logs_written %d, logs_dropped %d", written, dropped)
	if dropped > 0 {
		t.Errorf("envoy dropped %d ALS entries", dropped)
	}
}
