package trace_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	. "github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/trace"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

// agentServer is a fake agent: /trace answers lines (each after its
// delay), recording the queries it got.
type agentServer struct {
	*httptest.Server
	mu      sync.Mutex
	queries []url.Values
}

type timedLine struct {
	line  apiv1.TraceLine
	delay time.Duration
}

func newAgent(t *testing.T, lines []timedLine, follow bool) *agentServer {
	t.Helper()
	a := &agentServer{}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.queries = append(a.queries, r.URL.Query())
		a.mu.Unlock()
		if r.URL.Path != apiv1.TracePath {
			http.NotFound(w, r)
			return
		}
		if _, err := apiv1.ParseTraceQuery(r.URL.Query()); err != nil {
			http.Error(w, "trace: "+err.Error(), http.StatusBadRequest)
			return
		}
		rc := http.NewResponseController(w)
		w.WriteHeader(http.StatusOK)
		rc.Flush()
		enc := json.NewEncoder(w)
		for _, l := range lines {
			select {
			case <-time.After(l.delay):
			case <-r.Context().Done():
				return
			}
			enc.Encode(l.line)
			rc.Flush()
		}
		if follow {
			<-r.Context().Done()
		}
	}))
	t.Cleanup(a.Close)
	return a
}

// dialAgents sends each node's agent pod to its fake agent.
func dialAgents(agents map[string]*agentServer) Dialer {
	return func(ctx context.Context, pod *corev1.Pod) (*http.Client, func(), error) {
		a := agents[pod.Spec.NodeName]
		if a == nil {
			return nil, nil, fmt.Errorf("port-forward to %s: refused", pod.Name)
		}
		addr := a.Listener.Addr().String()
		return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		}}}, func() {}, nil
	}
}

func twoNodes(t *testing.T, extra ...runtime.Object) *testutil.Fake {
	t.Helper()
	objs := append([]runtime.Object{
		testutil.Namespace(),
		testutil.AgentPod("kebpf-agent-1", "node-1", testutil.RunningReady),
		testutil.AgentPod("kebpf-agent-2", "node-2", testutil.RunningReady),
	}, extra...)
	return testutil.NewFake(t, objs)
}

func runTrace(t *testing.T, f *testutil.Fake, agents map[string]*agentServer, o Options) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	o.Conn = kube.Conn{Clients: f.Clients}
	o.IOStreams = genericiooptions.IOStreams{Out: &out, ErrOut: &errOut}
	o.Dial = dialAgents(agents)
	o.Namespace = "x"
	o.Location = time.UTC
	if err := o.Complete(nil); err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	err = o.Run(context.Background())
	return out.String(), errOut.String(), err
}

func ev(e apiv1.TraceEvent, node string, ms int) apiv1.TraceLine {
	e.Node = node
	e.Time = T0.Add(time.Duration(ms) * time.Millisecond)
	return apiv1.TraceLine{Event: &e}
}

// TestRunMergesNodes: two nodes' histories come out as one, by time, the
// global --last applied, each agent asked with the flags' query.
func TestRunMergesNodes(t *testing.T) {
	f := twoNodes(t)
	agents := map[string]*agentServer{
		"node-1": newAgent(t, []timedLine{{line: ev(DenyEvent(), "node-1", 100)}, {line: ev(DenyEvent(), "node-1", 300)}}, false),
		"node-2": newAgent(t, []timedLine{{line: ev(AllowEvent(), "node-2", 200)}, {line: ev(AllowEvent(), "node-2", 400)}}, false),
	}
	out, stderr, err := runTrace(t, f, agents, Options{Last: 3, Verdicts: []string{"denied", "allowed"}})
	if err != nil {
		t.Fatalf("err %v; stderr %s", err, stderr)
	}
	var got []string
	for _, row := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		fields := strings.Fields(row)
		got = append(got, fields[0]+" "+fields[1]+" "+fields[3])
	}
	want := []string{"10:00:00.200 node-2 allowed", "10:00:00.300 node-1 denied", "10:00:00.400 node-2 allowed"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("rows %q, want %q\n%s", got, want, out)
	}
	for node, a := range agents {
		if len(a.queries) != 1 {
			t.Fatalf("node %s asked %d times", node, len(a.queries))
		}
		// Each node sends its own last 3; the plugin keeps the last 3 of all.
		if q := a.queries[0].Encode(); q != "last=3&namespace=x&verdict=denied&verdict=allowed" {
			t.Errorf("node %s query %q", node, q)
		}
	}
}

// TestRunLostIsIncomplete: a lost notice prints inline and the exit status
// says the trace is incomplete.
func TestRunLostIsIncomplete(t *testing.T) {
	f := twoNodes(t)
	agents := map[string]*agentServer{
		"node-1": newAgent(t, []timedLine{{line: ev(DenyEvent(), "node-1", 100)}, {line: LostAt("node-1", 150, 120)}}, false),
		"node-2": newAgent(t, nil, false),
	}
	out, _, err := runTrace(t, f, agents, Options{})
	var exit *cmdutil.ExitError
	if !errors.As(err, &exit) || exit.Code != ExitIncomplete {
		t.Fatalf("err %v, want exit %d", err, ExitIncomplete)
	}
	if !strings.Contains(out, "\nnode node-1: 120 events lost (kernel-buffer-full)\n") {
		t.Errorf("no inline notice:\n%s", out)
	}
}

// TestRunNodeUnreachable: one node that cannot be read is a warning and an
// incomplete trace; all nodes unreachable is an error.
func TestRunNodeUnreachable(t *testing.T) {
	f := twoNodes(t)
	agents := map[string]*agentServer{"node-1": newAgent(t, []timedLine{{line: ev(DenyEvent(), "node-1", 100)}}, false)}
	out, stderr, err := runTrace(t, f, agents, Options{})
	var exit *cmdutil.ExitError
	if !errors.As(err, &exit) || exit.Code != ExitIncomplete {
		t.Fatalf("err %v, want exit %d", err, ExitIncomplete)
	}
	if !strings.Contains(stderr, "warning: node node-2: port-forward to kebpf-agent-2: refused") || !strings.Contains(out, "node-1") {
		t.Errorf("stdout %s\nstderr %s", out, stderr)
	}
	_, _, err = runTrace(t, f, map[string]*agentServer{}, Options{})
	if err == nil || errors.As(err, &exit) {
		t.Fatalf("all unreachable: err %v, want an error", err)
	}
}

// TestRunAgentRejectsQuery: the agent's 400 line reaches the user.
func TestRunAgentRejectsQuery(t *testing.T) {
	f := twoNodes(t)
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, `trace: unknown parameter "since"`, http.StatusBadRequest)
	}))
	t.Cleanup(bad.Close)
	a := &agentServer{Server: bad}
	_, _, err := runTrace(t, f, map[string]*agentServer{"node-1": a, "node-2": a}, Options{})
	if err == nil || !strings.Contains(err.Error(), `node node-1: agent answered 400: trace: unknown parameter "since"`) {
		t.Fatalf("err %v", err)
	}
}

// TestRunPermissionDenied: one line naming the permission, before any
// connection.
func TestRunPermissionDenied(t *testing.T) {
	f := twoNodes(t)
	testutil.DenyAll(f.Kube)
	dialed := false
	var out, errOut bytes.Buffer
	o := &Options{Conn: kube.Conn{Clients: f.Clients}, IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut},
		Dial: func(context.Context, *corev1.Pod) (*http.Client, func(), error) {
			dialed = true
			return nil, nil, errors.New("no")
		}}
	err := testutil.RunOptions(t, o)
	want := "permission denied: kubectl ebpf trace needs list pods in kubectl-ebpf-system and create pods/portforward in kubectl-ebpf-system (it reaches each node's agent by a port-forward through the API server)"
	if err == nil || err.Error() != want {
		t.Fatalf("err %v\nwant %s", err, want)
	}
	if dialed {
		t.Error("dialed an agent without permission")
	}
}

// TestRunNotRunningAgent: a node whose agent pod is not running is named.
func TestRunNotRunningAgent(t *testing.T) {
	f := twoNodes(t, testutil.AgentPod("kebpf-agent-3", "node-3", corev1.PodStatus{Phase: corev1.PodPending}))
	agents := map[string]*agentServer{"node-1": newAgent(t, nil, false), "node-2": newAgent(t, nil, false)}
	_, stderr, err := runTrace(t, f, agents, Options{})
	var exit *cmdutil.ExitError
	if !errors.As(err, &exit) || exit.Code != ExitIncomplete {
		t.Fatalf("err %v, want exit %d", err, ExitIncomplete)
	}
	if !strings.Contains(stderr, "warning: node node-3: not traced: agent pod kebpf-agent-3 is Pending") {
		t.Errorf("stderr %s", stderr)
	}
	// --node elsewhere: node-3 is not asked and not missed.
	_, _, err = runTrace(t, f, agents, Options{Nodes: []string{"node-1"}})
	if err != nil {
		t.Fatalf("--node node-1: %v", err)
	}
	if n := len(agents["node-2"].queries); n != 1 {
		t.Errorf("--node node-1 asked node-2 (%d queries in all)", n)
	}
}

// TestFollow: events of two nodes, arriving out of order within the
// window, come out in order and promptly; the history is cut to --last.
func TestFollow(t *testing.T) {
	f := twoNodes(t)
	now := time.Now()
	live := func(node string, d time.Duration, e apiv1.TraceEvent) apiv1.TraceLine {
		e.Node, e.Time = node, now.Add(d)
		return apiv1.TraceLine{Event: &e}
	}
	hist := func(node string, d time.Duration) apiv1.TraceLine { return live(node, -d, DenyEvent()) }
	agents := map[string]*agentServer{
		// History: node-1 at -3s, -1s; node-2 at -2s. --last 2 keeps -2s, -1s.
		"node-1": newAgent(t, []timedLine{{line: hist("node-1", 3*time.Second)}, {line: hist("node-1", time.Second)},
			// Event at +500ms sent at once, +400ms of node-2 comes 150ms later.
			{line: live("node-1", 500*time.Millisecond, AllowEvent()), delay: 500 * time.Millisecond}}, true),
		"node-2": newAgent(t, []timedLine{{line: hist("node-2", 2*time.Second)},
			{line: live("node-2", 400*time.Millisecond, AllowEvent()), delay: 650 * time.Millisecond}}, true),
	}
	var out syncBuffer
	o := &Options{Conn: kube.Conn{Clients: f.Clients}, IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out},
		Dial: dialAgents(agents), Follow: true, Last: 2, Output: "json", Namespace: "x"}
	if err := o.Complete(nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	// The first line is out within the window (plus scheduling), not at
	// the end.
	deadline := time.Now().Add(2 * time.Second)
	for out.Len() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if first := time.Since(now); out.Len() == 0 || first > time.Second {
		t.Fatalf("first line after %v", first)
	}
	time.Sleep(1200 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, row := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var l apiv1.TraceLine
		if err := json.Unmarshal([]byte(row), &l); err != nil || l.Event == nil {
			t.Fatalf("row %q: %v", row, err)
		}
		got = append(got, fmt.Sprintf("%s %dms", l.Event.Node, l.Event.Time.Sub(now).Milliseconds()))
	}
	want := []string{"node-2 -2000ms", "node-1 -1000ms", "node-2 400ms", "node-1 500ms"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("followed %q, want %q", got, want)
	}
	if q := agents["node-1"].queries[0].Encode(); q != "follow=1&last=2&namespace=x" {
		t.Errorf("query %q", q)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFollowReconnects: a followed node whose stream ends (its agent
// restarted) is read again, from the time of the last line it sent.
func TestFollowReconnects(t *testing.T) {
	f := twoNodes(t)
	now := time.Now()
	first := ev(DenyEvent(), "node-1", 0)
	first.Event.Time = now.Add(100 * time.Millisecond)
	second := ev(AllowEvent(), "node-1", 0)
	second.Event.Time = now.Add(900 * time.Millisecond)
	var mu sync.Mutex
	var queries []url.Values
	restarting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n := len(queries)
		queries = append(queries, r.URL.Query())
		mu.Unlock()
		rc := http.NewResponseController(w)
		w.WriteHeader(http.StatusOK)
		rc.Flush()
		if n == 0 {
			// The first agent: one event, then it goes away.
			json.NewEncoder(w).Encode(first)
			return
		}
		json.NewEncoder(w).Encode(second)
		rc.Flush()
		<-r.Context().Done()
	}))
	t.Cleanup(restarting.Close)
	agents := map[string]*agentServer{"node-1": {Server: restarting}, "node-2": newAgent(t, nil, true)}
	var out, errOut syncBuffer
	o := &Options{Conn: kube.Conn{Clients: f.Clients}, IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &errOut},
		Dial: dialAgents(agents), Follow: true, Output: "json", Namespace: "x", Retry: 50 * time.Millisecond}
	if err := o.Complete(nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(ctx) }()
	deadline := time.Now().Add(3 * time.Second)
	for strings.Count(out.String(), "\n") < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(out.String(), "\n"); got != 2 {
		t.Fatalf("%d lines, want both events:\n%s\nstderr: %s", got, out.String(), errOut.String())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(queries) < 2 {
		t.Fatalf("asked %d times", len(queries))
	}
	wantSince := first.Event.Time.Add(time.Nanosecond).UTC().Format(time.RFC3339Nano)
	if q := queries[1]; q.Get("since") != wantSince || q.Get("last") != fmt.Sprint(apiv1.TraceMaxLast) || q.Get("follow") != "1" {
		t.Errorf("reconnect query %v, want since=%s and all of that history", q, wantSince)
	}
	if !strings.Contains(errOut.String(), "warning: node node-1: trace stream ended (agent restarted?); waiting for its agent") ||
		!strings.Contains(errOut.String(), "warning: node node-1: reading agent pod kebpf-agent-1") {
		t.Errorf("stderr: %s", errOut.String())
	}
}

// TestFollowWaitsForSlowNode: --last applies to every node's history even
// when one node's port-forward opens well after the window.
func TestFollowWaitsForSlowNode(t *testing.T) {
	f := twoNodes(t)
	now := time.Now()
	hist := func(node string, d time.Duration) apiv1.TraceLine {
		l := ev(DenyEvent(), node, 0)
		l.Event.Time = now.Add(-d)
		return l
	}
	agents := map[string]*agentServer{
		"node-1": newAgent(t, []timedLine{{line: hist("node-1", 3*time.Second)}}, true),
		// The newest history is on the slow node.
		"node-2": newAgent(t, []timedLine{{line: hist("node-2", time.Second)}}, true),
	}
	dial := dialAgents(agents)
	var out syncBuffer
	o := &Options{Conn: kube.Conn{Clients: f.Clients}, IOStreams: genericiooptions.IOStreams{Out: &out, ErrOut: &out},
		Follow: true, Last: 1, Output: "json", Namespace: "x",
		Dial: func(ctx context.Context, pod *corev1.Pod) (*http.Client, func(), error) {
			if pod.Spec.NodeName == "node-2" {
				time.Sleep(700 * time.Millisecond)
			}
			return dial(ctx, pod)
		}}
	if err := o.Complete(nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	if err := o.Run(ctx); err != nil {
		t.Fatal(err)
	}
	rows := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(rows) != 1 || !strings.Contains(rows[0], `"node":"node-2"`) {
		t.Errorf("--last 1 across a slow node: %q, want node-2's event only", rows)
	}
}
