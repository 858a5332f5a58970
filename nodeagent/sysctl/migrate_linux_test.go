//go:build linux

package sysctl

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// Why the init container sets tcp_migrate_req, on the real kernel: two
// listeners share a port through SO_REUSEPORT (an old and a new Envoy),
// clients connect, the kernel spreads them over both, and the old one
// closes before accepting its share. Without the parameter its share is
// reset; with it (set by Ensure, in the namespace's own /proc/sys) the
// survivor accepts every connection.
func TestIntegrationMigrateReq(t *testing.T) {
	bpftest.RequireRoot(t)
	ns := netnsutil.Path(bpftest.Netns(t, "kebpf-sysctl-"))
	for _, tc := range []struct {
		value   string
		migrate bool
	}{{"0", false}, {"1", true}} {
		var accepted, total int
		err := netnsutil.Do(ns, func() error {
			if _, err := os.Stat(DefaultProcSys + "/" + TCPMigrateReq); err != nil {
				return err
			}
			lo, err := netlink.LinkByName("lo")
			if err == nil {
				err = netlink.LinkSetUp(lo)
			}
			if err != nil {
				return err
			}
			if _, _, err := Ensure(DefaultProcSys, TCPMigrateReq, tc.value); err != nil {
				return err
			}
			accepted, total, err = closeOneOfTwo()
			return err
		})
		if errors.Is(err, os.ErrNotExist) {
			t.Skipf("this kernel has no %s (Linux 5.14+): %v", TCPMigrateReq, err)
		}
		if err != nil {
			t.Fatalf("tcp_migrate_req=%s: %v", tc.value, err)
		}
		t.Logf("tcp_migrate_req=%s: the surviving listener accepted %d of %d connections", tc.value, accepted, total)
		switch {
		case tc.migrate && accepted != total:
			t.Errorf("tcp_migrate_req=1: %d of %d connections lost when one listener closed", total-accepted, total)
		case !tc.migrate && accepted == total:
			// The kernel put all 64 on one listener: 2^-64 by chance.
			t.Errorf("tcp_migrate_req=0: no connection was lost; the test does not show what the parameter changes")
		}
	}
}

// closeOneOfTwo opens two SO_REUSEPORT listeners on one port, connects
// clients to it, closes the first listener without accepting, and counts
// what the second accepts. Runs in the caller's (locked) thread namespace.
func closeOneOfTwo() (accepted, total int, err error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) }); err != nil {
			return err
		}
		return serr
	}}
	ctx := context.Background()
	old, err := lc.Listen(ctx, "tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, 0, err
	}
	defer old.Close()
	survivor, err := lc.Listen(ctx, "tcp4", old.Addr().String())
	if err != nil {
		return 0, 0, err
	}
	defer survivor.Close()
	const n = 64
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp4", old.Addr().String(), time.Second)
		if err != nil {
			return 0, 0, err
		}
		defer c.Close()
	}
	old.Close()
	tl := survivor.(*net.TCPListener)
	for {
		if err := tl.SetDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
			return 0, 0, err
		}
		c, err := tl.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return accepted, n, nil
			}
			return 0, 0, err
		}
		accepted++
		c.Close()
	}
}
