//go:build linux

package netpol

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	"golang.org/x/sys/unix"
)

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestIntegrationInterfaces builds, in namespaces of its own, a bridge pod
// (the local cluster's bridge CNI: the route points at the bridge) and a
// ptp pod (kindnet: a /32 route per pod onto its veth), and finds both
// pods' host-side veths.
func TestIntegrationInterfaces(t *testing.T) {
	bpftest.RequireRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("needs iproute2 (ip) to build the test topology")
	}
	host, brPod, ptpPod := bpftest.Netns(t, "kebpf-npt-h"), bpftest.Netns(t, "kebpf-npt-b"), bpftest.Netns(t, "kebpf-npt-p")
	h := []string{"-n", host}
	ipCmd(t, append(h, "link", "add", "br0", "type", "bridge")...)
	ipCmd(t, append(h, "addr", "add", "10.99.0.1/24", "dev", "br0")...)
	ipCmd(t, append(h, "link", "set", "br0", "up")...)
	// Bridge pod.
	ipCmd(t, append(h, "link", "add", "vethb", "type", "veth", "peer", "name", "eth0", "netns", brPod)...)
	ipCmd(t, append(h, "link", "set", "vethb", "master", "br0", "up")...)
	ipCmd(t, "-n", brPod, "addr", "add", "10.99.0.5/24", "dev", "eth0")
	ipCmd(t, "-n", brPod, "link", "set", "eth0", "up")
	// A second bridge member whose pod has a different address.
	ipCmd(t, append(h, "link", "add", "vethc", "type", "veth", "peer", "name", "vpeer")...)
	ipCmd(t, append(h, "link", "set", "vethc", "master", "br0", "up")...)
	// ptp pod.
	ipCmd(t, append(h, "link", "add", "vethp", "type", "veth", "peer", "name", "eth0", "netns", ptpPod)...)
	ipCmd(t, append(h, "link", "set", "vethp", "up")...)
	ipCmd(t, "-n", ptpPod, "addr", "add", "10.98.0.5/32", "dev", "eth0")
	ipCmd(t, "-n", ptpPod, "link", "set", "eth0", "up")
	ipCmd(t, append(h, "route", "add", "10.98.0.5/32", "dev", "vethp")...)

	// Only our pod namespaces are scanned.
	dir := t.TempDir()
	for _, ns := range []string{brPod, ptpPod} {
		if err := os.Symlink(netnsutil.Path(ns), filepath.Join(dir, ns)); err != nil {
			t.Fatal(err)
		}
	}
	ifs := &NetlinkInterfaces{NetnsDirs: []string{dir}, Netns: netnsutil.Path(host)}
	hostHandle, err := handleAt(netnsutil.Path(host))
	if err != nil {
		t.Fatal(err)
	}
	defer hostHandle.Close()
	func() {
		want := map[string]int{}
		for _, n := range []string{"vethb", "vethp"} {
			l, err := hostHandle.LinkByName(n)
			if err != nil {
				t.Errorf("%s: %v", n, err)
				return
			}
			want[n] = l.Attrs().Index
		}
		for _, tc := range []struct {
			ip   string
			want int
		}{{"10.99.0.5", want["vethb"]}, {"10.98.0.5", want["vethp"]}, {"10.99.0.77", 0}} {
			got, err := ifs.IfIndex([]netip.Addr{netip.MustParseAddr(tc.ip)})
			if err != nil || got != tc.want {
				t.Errorf("IfIndex(%s) = %d, %v; want %d", tc.ip, got, err, tc.want)
			}
		}

		// A link event reaches the watcher.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var events atomic.Int32
		watchErr := make(chan error, 1)
		go func() { watchErr <- ifs.Watch(ctx, func() { events.Add(1) }) }()
		time.Sleep(100 * time.Millisecond) // subscribed
		if out, err := exec.Command("ip", "-n", host, "link", "add", "vethz", "type", "veth", "peer", "name", "vethz2").CombinedOutput(); err != nil {
			t.Errorf("add dummy: %v %s", err, out)
		}
		deadline := time.Now().Add(3 * time.Second)
		for events.Load() == 0 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if events.Load() == 0 {
			t.Error("no link event")
		}
		cancel()
		if err := <-watchErr; err != nil {
			t.Errorf("watch: %v", err)
		}
	}()

	// Without CAP_SYS_ADMIN (setns) the bridge pod's port cannot be found:
	// that must be an error (the endpoint then reports a problem), never
	// "no interface yet", which leaves the pod unenforced while the agent
	// says ready. Dropped on one locked thread only, which dies with it.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			errc <- fmt.Errorf("capget: %w", err)
			return
		}
		data[0].Effective &^= 1 << unix.CAP_SYS_ADMIN
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			errc <- fmt.Errorf("capset: %w", err)
			return
		}
		idx, err := ifs.ifIndex(hostHandle, netip.MustParseAddr("10.99.0.5"))
		if err == nil {
			err = fmt.Errorf("no error, ifindex %d", idx)
		}
		errc <- err
	}()
	if err := <-errc; err == nil || !strings.Contains(err.Error(), "CAP_SYS_ADMIN") {
		t.Errorf("bridge port lookup without CAP_SYS_ADMIN: %v, want an error naming CAP_SYS_ADMIN", err)
	}
}
