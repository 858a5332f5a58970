//go:build linux

package agent

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockstats"
)

// fakeAPI records server-side applies of NodeState.
type fakeAPI struct {
	mu      sync.Mutex
	applies []apiv1.NodeState
	queries []string
	fail    bool
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if r.Method != http.MethodPatch || r.Header.Get("Content-Type") != "application/apply-patch+yaml" ||
		!strings.HasPrefix(r.URL.Path, "/apis/kubectl-ebpf.io/v1alpha1/nodestates/") {
		http.Error(w, "unexpected "+r.Method+" "+r.URL.String(), http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		http.Error(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","code":500}`, http.StatusInternalServerError)
		return
	}
	var ns apiv1.NodeState
	if err := json.Unmarshal(body, &ns); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f.applies = append(f.applies, ns)
	f.queries = append(f.queries, r.URL.RawQuery)
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

func (f *fakeAPI) last() (apiv1.NodeState, string, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.applies) == 0 {
		return apiv1.NodeState{}, "", 0
	}
	return f.applies[len(f.applies)-1], f.queries[len(f.queries)-1], len(f.applies)
}

type running struct {
	base   string
	cancel func()
	done   chan error
}

func start(t *testing.T, api *fakeAPI, pinDir, cgroupRoot string) *running {
	t.Helper()
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	client, err := versioned.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{
		NodeName: "kebpf-node", PinDir: pinDir, CgroupRoot: cgroupRoot, Version: "test",
		Client: client, Listener: ln, Heartbeat: 100 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{base: "http://" + ln.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(r.stop)
	return r
}

func (r *running) stop() {
	r.cancel()
	<-r.done
	r.done <- nil // later stops return at once
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestIntegrationRunAttachesPublishesAndKeepsPinsOnExit(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	t.Cleanup(func() { sockstats.DetachPinned(pinDir) })
	api := &fakeAPI{}
	r := start(t, api, pinDir, cgroup)

	waitFor(t, "/readyz 200", func() bool { code, _ := get(t, r.base+"/readyz"); return code == 200 })
	if code, _ := get(t, r.base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	_, metrics := get(t, r.base+"/metrics")
	for _, want := range []string{`kebpf_sockets_created_total{family="inet"}`, `kebpf_sockets_created_total{family="inet6"}`,
		`kebpf_sockets_created_total{family="other"}`, `kebpf_agent_info{kernel="`, `version="test"`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	ns, query, _ := api.last()
	if !strings.Contains(query, "fieldManager=kebpf-agent") || !strings.Contains(query, "force=true") {
		t.Errorf("apply query = %q, want fieldManager=kebpf-agent and force=true", query)
	}
	if ns.Name != "kebpf-node" || ns.Kind != apiv1.NodeStateKind || ns.APIVersion != "kubectl-ebpf.io/v1alpha1" {
		t.Errorf("applied object = %s %s %s", ns.APIVersion, ns.Kind, ns.Name)
	}
	if !ns.Status.Ready || len(ns.Status.Active) != 1 || ns.Status.Active[0] != "sockstats" || len(ns.Status.Errors) != 0 {
		t.Errorf("status = %+v, want ready with active [sockstats]", ns.Status)
	}
	if ns.Status.Kernel == "" || ns.Status.AgentVersion != "test" || len(ns.Status.Features) == 0 || ns.Status.Heartbeat.IsZero() {
		t.Errorf("status lacks kernel/version/features/heartbeat: %+v", ns.Status)
	}
	if ns.Labels["app.kubernetes.io/managed-by"] != "kubectl-ebpf" || ns.Labels["app.kubernetes.io/part-of"] != "kubectl-ebpf" {
		t.Errorf("labels = %v", ns.Labels)
	}
	_, _, n := api.last()
	waitFor(t, "a heartbeat", func() bool { _, _, m := api.last(); return m > n })

	r.stop()
	// The agent exits without detaching: the pinned link keeps counting.
	out, err := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
	if err != nil || !strings.Contains(string(out), sockstats.ProgramName) {
		t.Errorf("after agent exit, %s not attached at %s: %v\n%s", sockstats.ProgramName, cgroup, err, out)
	}

	// A restarted agent takes the pinned link over and is ready again.
	r2 := start(t, api, pinDir, cgroup)
	waitFor(t, "/readyz 200 after restart", func() bool { code, _ := get(t, r2.base+"/readyz"); return code == 200 })
	out, _ = exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
	if c := strings.Count(string(out), sockstats.ProgramName); c != 1 {
		t.Errorf("after restart %d attachments at %s, want 1:\n%s", c, cgroup, out)
	}
}

func TestIntegrationNotReadyPublishesError(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	// A regular file can never become a cgroup root: setup fails for sure.
	badRoot := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(badRoot, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	api := &fakeAPI{}
	r := start(t, api, pinDir, badRoot)

	waitFor(t, "a publish", func() bool { _, _, n := api.last(); return n > 0 })
	ns, _, _ := api.last()
	if ns.Status.Ready || len(ns.Status.Active) != 0 || len(ns.Status.Errors) == 0 || !strings.Contains(ns.Status.Errors[0], badRoot) {
		t.Errorf("status = %+v, want not ready with an error naming %s", ns.Status, badRoot)
	}
	code, body := get(t, r.base+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, badRoot) {
		t.Errorf("/readyz = %d %q, want 503 naming %s", code, body, badRoot)
	}
}

func TestIntegrationNotReadyUntilPublished(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	t.Cleanup(func() { sockstats.DetachPinned(pinDir) })
	api := &fakeAPI{fail: true}
	r := start(t, api, pinDir, cgroup)

	time.Sleep(300 * time.Millisecond)
	if code, body := get(t, r.base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "NodeState") {
		t.Errorf("/readyz with a failing API = %d %q, want 503 about NodeState", code, body)
	}
	api.mu.Lock()
	api.fail = false
	api.mu.Unlock()
	waitFor(t, "/readyz 200 once the API recovers", func() bool { code, _ := get(t, r.base+"/readyz"); return code == 200 })
}

func TestLoopbackOnly(t *testing.T) {
	tests := []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:9890", true},
		{"[::1]:9890", true},
		{"0.0.0.0:9890", false},
		{":9890", false},
		{"10.0.0.1:9890", false},
		{"localhost:9890", false},
	}
	for _, tt := range tests {
		if err := loopbackOnly(tt.addr); (err == nil) != tt.ok {
			t.Errorf("loopbackOnly(%q) = %v, want ok=%v", tt.addr, err, tt.ok)
		}
	}
}
