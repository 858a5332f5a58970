//go:build linux

package netnsutil_test

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// ino is the inode of a namespace file: equal inodes, same namespace.
func ino(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Sys().(*syscall.Stat_t).Ino, nil
}

func nsIno(t *testing.T, path string) uint64 {
	t.Helper()
	n, err := ino(path)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestDo enters a fresh namespace, returns fn's error as is, and leaves the
// caller where it was.
func TestDo(t *testing.T) {
	bpftest.RequireRoot(t)
	path := netnsutil.Path(bpftest.Netns(t, "kebpf-nsu-"))
	target, own := nsIno(t, path), nsIno(t, "/proc/self/ns/net")
	if target == own {
		t.Fatal("the new namespace is the test's own")
	}
	sentinel := errors.New("from fn")
	var inside, before uint64
	err := netnsutil.Do(path, func() error {
		var err error
		if inside, err = ino("/proc/thread-self/ns/net"); err != nil {
			return err
		}
		return sentinel
	})
	if err != sentinel {
		t.Errorf("Do returned %v, want fn's error as is", err)
	}
	if inside != target {
		t.Error("fn did not run in the target namespace")
	}
	if err := netnsutil.Do("", func() (err error) {
		before, err = ino("/proc/thread-self/ns/net")
		return err
	}); err != nil || before != own {
		t.Errorf("Do(\"\") = %v, ran in namespace %d, want the caller's %d", err, before, own)
	}
	if err := netnsutil.Do("/nonexistent/netns", func() error { return nil }); err == nil {
		t.Error("Do on a missing path succeeded")
	}
}
