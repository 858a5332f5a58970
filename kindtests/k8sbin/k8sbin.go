// Package k8sbin builds (once, then caches) the Kubernetes binaries the
// Docker-free local cluster runs, from the wrapper module kindtests/k8sbuild.
package k8sbin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
)

// Version is the Kubernetes release the wrapper module pins.
const Version = "v1.35.4"

// Binaries are the commands Ensure builds, by base name.
var Binaries = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"}

var packages = []string{
	"k8s.io/kubernetes/cmd/kube-apiserver",
	"k8s.io/kubernetes/cmd/kube-controller-manager",
	"k8s.io/kubernetes/cmd/kube-scheduler",
	"k8s.io/kubernetes/cmd/kubelet",
	"k8s.io/kubernetes/cmd/kube-proxy",
	"k8s.io/kubernetes/cmd/kubectl",
}

// LDFlags stamp the release into the binaries; without them they report
// v0.0.0-master, which kubectl and the kubelet's node status then show.
const LDFlags = "-s -w" +
	" -X k8s.io/component-base/version.gitVersion=" + Version +
	" -X k8s.io/component-base/version.gitMajor=1" +
	" -X k8s.io/component-base/version.gitMinor=35" +
	" -X k8s.io/component-base/version.gitTreeState=clean" +
	" -X k8s.io/client-go/pkg/version.gitVersion=" + Version +
	" -X k8s.io/client-go/pkg/version.gitMajor=1" +
	" -X k8s.io/client-go/pkg/version.gitMinor=35"

// BinDir is where Ensure puts the binaries.
func BinDir() string {
	return filepath.Join(cluster.CacheDir(), "k8s-"+Version, "bin")
}

func stampPath() string { return filepath.Join(BinDir(), ".stamp") }

func stampContent() string { return Version + "\n" + LDFlags + "\n" }

// Cached reports whether every binary exists and the stamp matches, without
// building anything.
func Cached() bool {
	dir := BinDir()
	b, err := os.ReadFile(stampPath())
	if err != nil || string(b) != stampContent() {
		return false
	}
	for _, n := range Binaries {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			return false
		}
	}
	return true
}

// Ensure returns the directory holding the Kubernetes binaries, building them
// first when the cache is missing or was built with other flags.
func Ensure(ctx context.Context, log io.Writer) (string, error) {
	if log == nil {
		log = io.Discard
	}
	dir := BinDir()
	if Cached() {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	// One build at a time: a second concurrent link of kube-apiserver needs
	// another ~2.4 GB and both would write the same files.
	lock, err := os.OpenFile(filepath.Join(filepath.Dir(dir), ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := flock(ctx, lock, "the Kubernetes binaries", log); err != nil {
		return "", err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	// A build started outside this code (by hand, or by an older process)
	// may be writing into dir; wait for it instead of racing it.
	if err := waitForeignBuild(ctx, dir, log); err != nil {
		return "", err
	}
	if Cached() {
		return dir, nil
	}
	if verify(ctx, dir) == nil {
		if err := os.WriteFile(stampPath(), []byte(stampContent()), 0o644); err != nil {
			return "", fmt.Errorf("write stamp: %w", err)
		}
		return dir, nil
	}

	src, err := SourceDir()
	if err != nil {
		return "", err
	}
	fmt.Fprintf(log, "building Kubernetes %s binaries (cold build takes ~10 min)...\n", Version)
	start := time.Now()
	args := append([]string{"build", "-trimpath", "-ldflags", LDFlags, "-o", dir + "/"}, packages...)
	if err := goBuild(ctx, log, src, args); err != nil {
		return "", fmt.Errorf("go build kubernetes %s: %w", Version, err)
	}
	if err := verify(ctx, dir); err != nil {
		return "", err
	}
	if err := os.WriteFile(stampPath(), []byte(stampContent()), 0o644); err != nil {
		return "", fmt.Errorf("write stamp: %w", err)
	}
	fmt.Fprintf(log, "built Kubernetes %s binaries in %s\n", Version, time.Since(start).Round(time.Second))
	return dir, nil
}

// goBuild runs `go args...` in the wrapper module src, statically and outside
// any go.work, printing a line every minute: a cold build takes minutes and a
// silent one looks hung.
func goBuild(ctx context.Context, log io.Writer, src string, args []string) error {
	start := time.Now()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off")
	cmd.Stdout = log
	cmd.Stderr = log
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintf(log, "  still building (%s)\n", time.Since(start).Round(time.Second))
			}
		}
	}()
	err := cmd.Run()
	close(done)
	return err
}

func flock(ctx context.Context, f *os.File, what string, log io.Writer) error {
	warned := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("lock build dir: %w", err)
		}
		if !warned {
			fmt.Fprintf(log, "another process is building %s; waiting\n", what)
			warned = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

// verify runs every binary with --version and checks it reports Version.
func verify(ctx context.Context, dir string) error {
	for _, n := range Binaries {
		p := filepath.Join(dir, n)
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("binary %s: %w", n, err)
		}
		vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		args := []string{"--version"}
		if n == "kubectl" {
			args = []string{"version", "--client"}
		}
		out, err := exec.CommandContext(vctx, p, args...).CombinedOutput()
		cancel()
		if err != nil {
			return fmt.Errorf("%s --version: %w: %s", n, err, bytes.TrimSpace(out))
		}
		if !bytes.Contains(out, []byte(Version)) {
			return fmt.Errorf("%s reports %q, want %s", n, bytes.TrimSpace(out), Version)
		}
	}
	return nil
}

// waitForeignBuild waits while any `go build` process writes into dir.
func waitForeignBuild(ctx context.Context, dir string, log io.Writer) error {
	start := time.Now()
	last := time.Time{}
	for {
		pid := foreignBuild(dir)
		if pid == 0 {
			return nil
		}
		if time.Since(last) > time.Minute {
			fmt.Fprintf(log, "waiting for a running Kubernetes build (pid %d) into %s (%s so far)\n", pid, dir, time.Since(start).Round(time.Second))
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(3 * time.Second):
		}
	}
}

// foreignBuild is the pid of a `go build` writing into dir, or 0.
func foreignBuild(dir string) int {
	pids := cluster.FindProcs(func(args []string) bool {
		if len(args) < 2 || filepath.Base(args[0]) != "go" || args[1] != "build" {
			return false
		}
		return slices.ContainsFunc(args, func(a string) bool { return strings.TrimRight(a, "/") == strings.TrimRight(dir, "/") })
	})
	if len(pids) == 0 {
		return 0
	}
	return pids[0]
}

// SourceDir finds the wrapper module kindtests/k8sbuild: next to this source
// file when it is on disk, else inside the main module of the working dir.
func SourceDir() (string, error) { return wrapperDir("k8sbuild") }

// wrapperDir finds the wrapper module kindtests/<name>.
func wrapperDir(name string) (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		d := filepath.Join(filepath.Dir(file), "..", name)
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Clean(d), nil
		}
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	d := filepath.Join(root, "kindtests", name)
	if _, err := os.Stat(filepath.Join(d, "go.mod")); err != nil {
		return "", fmt.Errorf("find kindtests/%s: %w", name, err)
	}
	return d, nil
}

// ModuleRoot is the directory of the kubectl-ebpf main module.
func ModuleRoot() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		d := filepath.Join(filepath.Dir(file), "..", "..")
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Clean(d), nil
		}
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kubectl-ebpf/kubectl-ebpf").Output()
	if err != nil {
		return "", fmt.Errorf("find module github.com/kubectl-ebpf/kubectl-ebpf (run from inside the repository): %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}
