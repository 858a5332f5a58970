package k8sbin

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
)

// CoreDNSVersion is the CoreDNS release the wrapper module kindtests/corednsbuild
// pins (go.mod there must require exactly this version).
const CoreDNSVersion = "v1.15.0"

// coreDNSPackage is CoreDNS's own main (coredns.go at the module root), with
// every in-tree plugin: the binary is the release, not a custom build.
const coreDNSPackage = "github.com/coredns/coredns"

// CoreDNSLDFlags stamp the release into `coredns -version` (CoreDNS's Makefile
// puts its git commit there).
const CoreDNSLDFlags = "-s -w -X github.com/coredns/coredns/coremain.GitCommit=" + CoreDNSVersion

// CoreDNSBinary is where EnsureCoreDNS puts the coredns binary.
func CoreDNSBinary() string {
	return filepath.Join(cluster.CacheDir(), "coredns-"+CoreDNSVersion, "coredns")
}

func coreDNSStamp() string { return CoreDNSBinary() + ".stamp" }

func coreDNSStampContent() string { return CoreDNSVersion + "\n" + CoreDNSLDFlags + "\n" }

// CoreDNSCached reports whether the binary exists with a matching stamp,
// without building anything.
func CoreDNSCached() bool {
	b, err := os.ReadFile(coreDNSStamp())
	if err != nil || string(b) != coreDNSStampContent() {
		return false
	}
	_, err = os.Stat(CoreDNSBinary())
	return err == nil
}

// CoreDNSSourceDir finds the wrapper module kindtests/corednsbuild.
func CoreDNSSourceDir() (string, error) { return wrapperDir("corednsbuild") }

// EnsureCoreDNS returns the path of the coredns binary, building it first from
// the wrapper module when the cache is missing or was built with other flags.
func EnsureCoreDNS(ctx context.Context, log io.Writer) (string, error) {
	if log == nil {
		log = io.Discard
	}
	bin := CoreDNSBinary()
	if CoreDNSCached() {
		return bin, nil
	}
	dir := filepath.Dir(bin)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	// One build at a time per cache: two concurrent `up`s would both link
	// into the same file.
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open build lock: %w", err)
	}
	defer lock.Close()
	if err := flock(ctx, lock, "CoreDNS", log); err != nil {
		return "", err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if CoreDNSCached() {
		return bin, nil
	}
	src, err := CoreDNSSourceDir()
	if err != nil {
		return "", err
	}
	fmt.Fprintf(log, "building CoreDNS %s from its Go module (cold build takes ~3 min)...\n", CoreDNSVersion)
	start := time.Now()
	tmp := bin + ".tmp"
	if err := goBuild(ctx, log, src, []string{"build", "-trimpath", "-ldflags", CoreDNSLDFlags, "-o", tmp, coreDNSPackage}); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("go build coredns %s: %w", CoreDNSVersion, err)
	}
	if err := verifyCoreDNS(ctx, tmp); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, bin); err != nil {
		return "", fmt.Errorf("install coredns: %w", err)
	}
	if err := os.WriteFile(coreDNSStamp(), []byte(coreDNSStampContent()), 0o644); err != nil {
		return "", fmt.Errorf("write stamp: %w", err)
	}
	fmt.Fprintf(log, "built CoreDNS %s in %s\n", CoreDNSVersion, time.Since(start).Round(time.Second))
	return bin, nil
}

// verifyCoreDNS checks that bin reports CoreDNSVersion: a wrapper go.mod that
// drifted from the constant would otherwise ship another release silently.
func verifyCoreDNS(ctx context.Context, bin string) error {
	vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, bin, "-version").CombinedOutput()
	if err != nil {
		return fmt.Errorf("coredns -version: %w: %s", err, bytes.TrimSpace(out))
	}
	if want := "CoreDNS-" + strings.TrimPrefix(CoreDNSVersion, "v"); !bytes.Contains(out, []byte(want)) {
		return fmt.Errorf("coredns -version reports %q, want %s (kindtests/corednsbuild/go.mod and k8sbin.CoreDNSVersion disagree)", bytes.TrimSpace(out), want)
	}
	return nil
}
