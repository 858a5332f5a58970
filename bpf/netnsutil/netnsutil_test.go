//go:build linux

package netnsutil_test

import (
	"errors"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// TestDo enters a fresh namespace, returns fn's error as is, and leaves the
// caller's thread where it was.
func TestDo(t *testing.T) {
	bpftest.RequireRoot(t)
	name := bpftest.Netns(t, "kebpf-nsu-")
	target, err := netns.GetFromPath(netnsutil.Path(name))
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	own, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()

	sentinel := errors.New("from fn")
	var inside bool
	err = netnsutil.Do(netnsutil.Path(name), func() error {
		cur, err := netns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		inside = cur.Equal(target)
		return sentinel
	})
	if err != sentinel {
		t.Errorf("Do returned %v, want fn's error as is", err)
	}
	if !inside {
		t.Error("fn did not run in the target namespace")
	}
	if err := netnsutil.Do("", func() error {
		cur, err := netns.Get()
		if err != nil {
			return err
		}
		defer cur.Close()
		if !cur.Equal(own) {
			return errors.New("Do(\"\") left the caller's namespace")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if err := netnsutil.Do("/nonexistent/netns", func() error { return nil }); err == nil {
		t.Error("Do on a missing path succeeded")
	}
}
