//go:build linux

package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

type testNamer struct {
	*netpol.IDs
	pods map[netip.Addr]types.NamespacedName
}

func (n testNamer) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	k, ok := n.pods[ip.Unmap()]
	return k, ok
}

// TestTraceDenyEvent: the real policy programs on a pod's host-side veth
// drop a connection under a default-deny policy; the deny comes out of the
// agent's /trace stream naming the policy and both pods. The policy's ID
// was assigned by an "earlier agent" and is named by an allocator loaded
// from its state file, as after a restart.
func TestTraceDenyEvent(t *testing.T) {
	bpftest.RequireRoot(t)
	const (
		ipNA, ipA = "10.126.0.1", "10.126.0.2"
		ipNB, ipB = "10.126.0.17", "10.126.0.18"
	)
	n, a, b := bpftest.Netns(t, "kebpf-tr-n"), bpftest.Netns(t, "kebpf-tr-a"), bpftest.Netns(t, "kebpf-tr-b")
	for _, c := range [][]string{
		{"ip", "-n", n, "link", "add", "va", "type", "veth", "peer", "name", "eth0", "netns", a},
		{"ip", "-n", n, "link", "add", "vb", "type", "veth", "peer", "name", "eth0", "netns", b},
		{"ip", "-n", n, "addr", "add", ipNA + "/28", "dev", "va"},
		{"ip", "-n", n, "addr", "add", ipNB + "/28", "dev", "vb"},
		{"ip", "-n", a, "addr", "add", ipA + "/28", "dev", "eth0"},
		{"ip", "-n", b, "addr", "add", ipB + "/28", "dev", "eth0"},
		{"ip", "-n", n, "link", "set", "va", "up"},
		{"ip", "-n", n, "link", "set", "vb", "up"},
		{"ip", "-n", a, "link", "set", "eth0", "up"},
		{"ip", "-n", b, "link", "set", "eth0", "up"},
		{"ip", "-n", a, "route", "add", "default", "via", ipNA},
		{"ip", "-n", b, "route", "add", "default", "via", ipNB},
		{"ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
	} {
		sh(t, c...)
	}
	inN := func(fn func() error) error { return netnsutil.Do(netnsutil.Path(n), fn) }
	var ifB int
	if err := inN(func() error {
		l, err := net.InterfaceByName("vb")
		if err == nil {
			ifB = l.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}

	// The earlier agent: assigns the policy's ID and records it.
	idsPath := filepath.Join(t.TempDir(), "state", PolicyIDsFile)
	earlier, err := netpol.LoadIDs(idsPath)
	if err != nil {
		t.Fatal(err)
	}
	earlier.Policy("shop", "allow-web") // so the ID under test is not 1
	policyID := earlier.Policy("shop", "deny-all")
	if err := earlier.Save(); err != nil {
		t.Fatal(err)
	}

	pinDir := bpftest.PinDir(t)
	t.Cleanup(func() { inN(func() error { return dp.DetachPinned(pinDir) }) })
	var objs *dp.Objects
	if err := inN(func() error {
		var err error
		objs, err = dp.Load(pinDir, dp.LoadOptions{MaxCT: 4096, MaxVerdicts: 4096, MaxPolicyEntries: 1024, MaxEndpoints: 16})
		if err != nil {
			return err
		}
		if err := objs.SetHostIPs([]netip.Addr{netip.MustParseAddr(ipNA), netip.MustParseAddr(ipNB)}); err != nil {
			return err
		}
		return objs.ApplyEndpoint(dp.EndpointPolicy{ID: 2, IfIndex: ifB, IPs: []netip.Addr{netip.MustParseAddr(ipB)},
			IngressEnforced: true, DefaultDenyPolicy: policyID})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })

	// The restarted agent: its IDs come from the state file.
	ids, err := netpol.LoadIDs(idsPath)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ag, err := New(Config{NodeName: "kebpf-node", Listener: ln, Features: []Feature{},
		Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	agentDone, readerDone := make(chan error, 1), make(chan error, 1)
	go func() { agentDone <- ag.Run(ctx) }()
	reader := &trace.PolicyReader{Events: objs.EventsMap(), Lost: objs.EventsLost, Hub: ag.trace, Node: "kebpf-node", Log: slog.Default(),
		Namer: testNamer{IDs: ids, pods: map[netip.Addr]types.NamespacedName{
			netip.MustParseAddr(ipA): {Namespace: "web", Name: "client"},
			netip.MustParseAddr(ipB): {Namespace: "shop", Name: "server"},
		}}}
	go func() { readerDone <- reader.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-readerDone; err != nil {
			t.Errorf("reader: %v", err)
		}
		<-agentDone
	})

	base := "http://" + ln.Addr().String()
	var resp *http.Response
	waitFor(t, "agent serving /trace", func() bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/trace?follow=1&verdict=denied&to-pod=shop/server", nil)
		resp, err = http.DefaultClient.Do(req)
		return err == nil
	})
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/trace: %s", resp.Status)
	}

	// a -> b:80: b's ingress default-denies it.
	if err := netnsutil.Do(netnsutil.Path(a), func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(ipB, "80"), 300*time.Millisecond)
		if err == nil {
			c.Close()
			t.Errorf("a -> b:80 connected through a default deny")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	lines := make(chan apiv1.TraceLine, 1)
	go func() {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			var l apiv1.TraceLine
			if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
				t.Errorf("line %q: %v", sc.Text(), err)
				return
			}
			lines <- l
			return
		}
	}()
	var l apiv1.TraceLine
	select {
	case l = <-lines:
	case <-time.After(5 * time.Second):
		t.Fatal("no deny event on /trace within 5s")
	}
	e := l.Event
	if e == nil {
		t.Fatalf("first line is not an event: %+v", l)
	}
	if e.Type != apiv1.TraceTypePolicy || e.Verdict != apiv1.TraceVerdictDenied || e.Reason != apiv1.TraceReasonDefaultDeny ||
		e.Direction != "ingress" || e.Protocol != "TCP" || e.Node != "kebpf-node" {
		t.Errorf("event %+v", e)
	}
	if e.Policy == nil || e.Policy.Namespace != "shop" || e.Policy.Name != "deny-all" || e.Policy.Unknown || e.Policy.Rule != nil {
		t.Errorf("policy %+v, want shop/deny-all's default deny", e.Policy)
	}
	if e.Source != (apiv1.TracePeer{Namespace: "web", Pod: "client", IP: ipA, Port: e.Source.Port}) ||
		e.Destination != (apiv1.TracePeer{Namespace: "shop", Pod: "server", IP: ipB, Port: 80}) {
		t.Errorf("peers %+v -> %+v", e.Source, e.Destination)
	}
	if time.Since(e.Time).Abs() > time.Minute {
		t.Errorf("event time %v is not now", e.Time)
	}
	t.Logf("trace line: %s", e.Message)
}

// A corrupt ID file does not stop the policy feature: it is set aside and
// new IDs start above any the old file can have held.
func TestLoadPolicyIDsCorrupt(t *testing.T) {
	dir := t.TempDir()
	ag, err := New(Config{NodeName: "n", StateDir: dir, Features: []Feature{},
		Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, PolicyIDsFile)
	if err := os.WriteFile(path, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := uint32(time.Now().Unix())
	ids := ag.loadPolicyIDs()
	if id := ids.Policy("x", "a"); id <= before {
		t.Errorf("fresh ID %d is not above %d", id, before)
	}
	if err := ids.Save(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".bad"); err != nil {
		t.Errorf("corrupt file not set aside: %v", err)
	}
	again, err := netpol.LoadIDs(path)
	if err != nil {
		t.Fatalf("the new file is unreadable: %v", err)
	}
	if n, ok := again.PolicyName(ids.Policy("x", "a")); !ok || n != "x/a" {
		t.Errorf("new file names %q %v", n, ok)
	}
}

// The agent's loopback server serves the trace and its loss metrics.
func TestServeTrace(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ag, err := New(Config{NodeName: "n", Listener: ln, Features: []Feature{},
		Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	srv, _, err := ag.serve()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	base := "http://" + ln.Addr().String()
	ag.trace.Publish(apiv1.TraceEvent{Node: "n", Type: apiv1.TraceTypePolicy, Verdict: apiv1.TraceVerdictDenied,
		Destination: apiv1.TracePeer{Namespace: "shop", Pod: "server", IP: "10.0.0.2", Port: 80}})
	if code, body := get(t, base+"/trace?verdict=dropped"); code != http.StatusBadRequest || !strings.Contains(body, "verdict") {
		t.Errorf("bad filter: %d %q", code, body)
	}
	code, body := get(t, base+"/trace?to-pod=shop/server")
	var l apiv1.TraceLine
	if err := json.Unmarshal([]byte(body), &l); code != http.StatusOK || err != nil || l.Event == nil || l.Event.Destination.Pod != "server" {
		t.Errorf("/trace: %d %q (%v)", code, body, err)
	}
	if code, body := get(t, base+"/trace?to-pod=shop/other"); code != http.StatusOK || body != "" {
		t.Errorf("filtered /trace: %d %q", code, body)
	}
	if _, body := get(t, base+"/metrics"); !strings.Contains(body, `kebpf_trace_events_lost_total{reason="kernel-buffer-full"} 0`) ||
		!strings.Contains(body, `kebpf_trace_events_total{type="policy"} 1`) {
		t.Errorf("/metrics lacks the trace counters:\n%s", body)
	}
}

// NodeState carries the trace counts; a reason's first loss changes what
// is published at once, more events and more of the same loss wait for the
// heartbeat.
func TestTraceStatus(t *testing.T) {
	ag, err := New(Config{NodeName: "n", Features: []Feature{}, Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	key0 := statusKey(ag.State().Status)
	ag.trace.Publish(apiv1.TraceEvent{Node: "n", Type: apiv1.TraceTypePolicy})
	if k := statusKey(ag.State().Status); k != key0 {
		t.Errorf("an event changed the status key:\n%s\n%s", key0, k)
	}
	ag.trace.Lost(apiv1.TraceLostKernel, apiv1.TraceTypePolicy, 3)
	st := ag.State().Status
	key1 := statusKey(st)
	if key1 == key0 {
		t.Error("the first loss did not change the status key")
	}
	if st.Trace == nil || st.Trace.Published[apiv1.TraceTypePolicy] != 1 || st.Trace.Lost[apiv1.TraceLostKernel] != 3 ||
		st.Trace.Lost[apiv1.TraceLostSlowClient] != 0 || len(st.Trace.Lost) != 3 || len(st.Trace.Published) != len(apiv1.TraceTypes) {
		t.Errorf("trace status %+v", st.Trace)
	}
	ag.trace.Lost(apiv1.TraceLostKernel, apiv1.TraceTypePolicy, 3)
	if k := statusKey(ag.State().Status); k != key1 {
		t.Errorf("a further loss of the same reason changed the status key")
	}
}
