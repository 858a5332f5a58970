//go:build linux

package app

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAdmin serves handler on a unix socket like Envoy's admin API and
// records the requests.
func fakeAdmin(t *testing.T, handler http.HandlerFunc) (socket string, requests func() []string) {
	t.Helper()
	socket = filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Method+" "+r.URL.RequestURI())
		mu.Unlock()
		handler(w, r)
	})}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	return socket, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

func runAgent(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := NewRootCommand(&out, &errOut)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String() + errOut.String(), err
}

func TestEnvoyProbe(t *testing.T) {
	tests := []struct {
		name    string
		code    int
		body    string
		wantErr string
		wantOut string
	}{
		{name: "live", code: 200, body: "LIVE\n", wantOut: "LIVE\n"},
		{name: "initializing", code: 503, body: "PRE_INITIALIZING\n", wantErr: "envoy not ready: 503 PRE_INITIALIZING"},
		{name: "draining", code: 503, body: "DRAINING\n", wantErr: "envoy not ready: 503 DRAINING"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock, requests := fakeAdmin(t, func(w http.ResponseWriter, _ *http.Request) {
				w.WriteHeader(tt.code)
				w.Write([]byte(tt.body))
			})
			out, err := runAgent(t, "envoy-probe", "--admin-socket", sock)
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
			if out != tt.wantOut {
				t.Errorf("output %q, want %q", out, tt.wantOut)
			}
			if got := requests(); len(got) != 1 || got[0] != "GET /ready" {
				t.Errorf("requests %v, want one GET /ready", got)
			}
		})
	}
}

func TestEnvoyProbeNoEnvoy(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	_, err := runAgent(t, "envoy-probe", "--admin-socket", sock)
	if err == nil || !strings.Contains(err.Error(), sock) || strings.Contains(err.Error(), "http://") {
		t.Errorf("err = %v, want one naming the socket, not a made-up URL", err)
	}
	// A hung Envoy fails the probe within --timeout.
	hung, _ := fakeAdmin(t, func(http.ResponseWriter, *http.Request) { time.Sleep(2 * time.Second) })
	start := time.Now()
	if _, err := runAgent(t, "envoy-probe", "--admin-socket", hung, "--timeout", "100ms"); err == nil {
		t.Error("probe of a hung Envoy passed")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("probe took %s with --timeout 100ms", d)
	}
}

func TestEnvoyDrain(t *testing.T) {
	sock, requests := fakeAdmin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		w.Write([]byte("OK\n"))
	})
	start := time.Now()
	out, err := runAgent(t, "envoy-drain", "--admin-socket", sock, "--wait", "200ms")
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Errorf("returned after %s, before --wait", d)
	}
	if got := requests(); len(got) != 1 || got[0] != "POST /drain_listeners?graceful&skip_exit" {
		t.Errorf("requests %v", got)
	}
	if !strings.Contains(out, "draining") {
		t.Errorf("output %q", out)
	}

	refuse, _ := fakeAdmin(t, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNotFound) })
	if _, err := runAgent(t, "envoy-drain", "--admin-socket", refuse, "--wait", "0s"); err == nil || !strings.Contains(err.Error(), "envoy refused to drain: 404") {
		t.Errorf("err = %v", err)
	}
}

func TestEnvoyBootstrap(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "bootstrap.json")
	self := filepath.Join(dir, "bin", "kebpf-agent")
	if err := os.Mkdir(filepath.Dir(self), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("NODE_NAME", "node-a")
	if _, err := runAgent(t, "envoy-bootstrap", "--admin-socket", "/run/envoy/admin.sock", "--out", out, "--copy-self", self); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Node struct {
			ID string `json:"id"`
		} `json:"node"`
		Admin struct {
			Address struct {
				Pipe struct {
					Path string `json:"path"`
				} `json:"pipe"`
			} `json:"address"`
		} `json:"admin"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("bootstrap is not JSON: %v", err)
	}
	if got.Node.ID != "node-a" || got.Admin.Address.Pipe.Path != "/run/envoy/admin.sock" {
		t.Errorf("node id %q (want $NODE_NAME), admin socket %q", got.Node.ID, got.Admin.Address.Pipe.Path)
	}
	// The default xDS socket is the one the manifests mount.
	if !strings.Contains(string(b), `"/run/kubectl-ebpf/envoy/xds.sock"`) {
		t.Errorf("bootstrap does not use the default xDS socket:\n%s", b)
	}
	st, err := os.Stat(self)
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	want, _ := os.Stat(exe)
	if st.Mode().Perm() != 0o755 || st.Size() != want.Size() {
		t.Errorf("copy: mode %v size %d, want 0755 and %d bytes", st.Mode().Perm(), st.Size(), want.Size())
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}

	t.Setenv("NODE_NAME", "")
	if _, err := runAgent(t, "envoy-bootstrap", "--out", out); err == nil || !strings.Contains(err.Error(), "node and xds socket are required") {
		t.Errorf("without a node: err = %v", err)
	}
}
