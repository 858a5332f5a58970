//go:build linux

// Package bpftest holds the helpers of the root test tier: tests that load
// BPF programs, mount bpffs, create cgroups or network namespaces.
//
// The tier's rule: under -short such a test skips (the fast tier needs no
// root); without -short it runs, and a machine that cannot run it (not
// root) fails it rather than skipping, so a green run means it ran.
package bpftest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// CgroupParent is the host's cgroup v2 mount (hybrid layout) under which
// test cgroups are created.
const CgroupParent = "/sys/fs/cgroup/unified"

// RequireRoot skips tb under -short and fails it when not root.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("root tier: run without -short as root")
	}
	if os.Geteuid() != 0 {
		tb.Fatal("root tier: this test loads BPF programs, mounts bpffs or creates cgroups and network namespaces; " +
			"run it as root (sudo go test ./...), or with -short to skip it")
	}
}

// RandSuffix is 8 random hex digits for names of test objects.
func RandSuffix(tb testing.TB) string {
	tb.Helper()
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		tb.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// BPFFS mounts a private bpffs, unmounted at cleanup, so pins never touch
// /sys/fs/bpf, and returns its mount point.
func BPFFS(tb testing.TB) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		tb.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}

// PinDir is a pin directory (not created yet) on a private bpffs.
func PinDir(tb testing.TB) string {
	tb.Helper()
	return filepath.Join(BPFFS(tb), "kubectl-ebpf")
}

// Cgroup creates a fresh cgroup v2 directory, removed at cleanup.
func Cgroup(tb testing.TB) string {
	tb.Helper()
	return SubCgroup(tb, CgroupParent, "kebpf-test-"+RandSuffix(tb))
}

// Netns creates a named network namespace prefix+<random>, deleted at
// cleanup, and returns its name.
func Netns(tb testing.TB, prefix string) string {
	tb.Helper()
	name := prefix + RandSuffix(tb)
	if _, err := netnsutil.Create(name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := netnsutil.Delete(name); err != nil {
			tb.Errorf("%v", err)
		}
	})
	return name
}

// SubCgroup creates the cgroup parent/name, removed at cleanup (register
// it after parent's, so it goes first).
func SubCgroup(tb testing.TB, parent, name string) string {
	tb.Helper()
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		tb.Fatalf("create cgroup %s: %v", dir, err)
	}
	tb.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			tb.Errorf("remove cgroup %s: %v", dir, err)
		}
	})
	return dir
}

// CgroupID is the id of the cgroup v2 directory dir (its inode number), as
// bpf_get_current_cgroup_id returns it.
func CgroupID(tb testing.TB, dir string) uint64 {
	tb.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		tb.Fatalf("stat cgroup %s: %v", dir, err)
	}
	return st.Ino
}

var cgMove sync.Mutex

// InCgroup runs fn with the whole test process in the cgroup v2 directory
// dir and moves it back afterwards, also when fn fails the test. A socket
// belongs to its creator's cgroup at socket(), and a child process starts
// in its parent's, so this is how a test puts a socket or a process (a
// stand-in client, a real Envoy) under a cgroup program without helpers.
func InCgroup(tb testing.TB, dir string, fn func()) {
	tb.Helper()
	cgMove.Lock()
	defer cgMove.Unlock()
	home, err := ownCgroup()
	if err != nil {
		tb.Fatal(err)
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0); err != nil {
		tb.Fatalf("move into %s: %v", dir, err)
	}
	defer func() {
		if err := os.WriteFile(filepath.Join(CgroupParent, home, "cgroup.procs"), pid, 0); err != nil {
			tb.Errorf("move back to %s: %v", home, err)
		}
	}()
	fn()
}

// ownCgroup is this process's cgroup v2 path (the "0::" line).
func ownCgroup() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p, nil
		}
	}
	return "", errors.New("no cgroup v2 line in /proc/self/cgroup")
}
