//go:build linux

package socklb

import (
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// An agent upgrade that grows the frontend, backend and rev-NAT maps (a
// layout change: max_entries) migrates them: services keep resolving for
// new connects, and a UDP socket connected to a VIP before the upgrade
// still shows the VIP (getpeername, recvfrom source) after it, which only
// its migrated rev-NAT entry can give; the old maps are freed once Attach
// switched the links, nothing stays at a temporary pin.
func TestIntegrationUpgradeMigratesMaps(t *testing.T) {
	bpftest.RequireRoot(t)
	ns := testNetns(t)
	pinDir := bpftest.PinDir(t)
	cg := bpftest.Cgroup(t)
	t.Cleanup(func() { DetachPinned(pinDir) })
	srv := startServer(t, ns, "tcp", "127.0.0.1:0")
	usrv := startServer(t, ns, "udp", "[::1]:0")
	const tcpVIP, udpVIP = "10.96.5.1:80", "[fd00:96::5]:53"
	svcs := map[uint32]Service{
		1: {ID: 1, Frontends: []Frontend{fe(tcpVIP, TCP)}, Backends: backends(srv)},
		2: {ID: 2, Frontends: []Frontend{fe(udpVIP, UDP)}, Backends: backends(usrv)},
	}
	var logs bpftest.LogBuffer
	v1 := LoadOptions{MaxFrontends: 8, MaxBackends: 8, MaxAffinity: 64, MaxRevNAT: 64,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	v2 := v1
	v2.MaxFrontends, v2.MaxBackends, v2.MaxRevNAT = 64, 64, 1024

	first, err := Load(pinDir, v1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { first.Close() })
	if err := first.Attach(cg); err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		mustApply(t, first, s)
	}

	// Live sockets of the cgroup, connected to the UDP VIP.
	connect := func() int {
		t.Helper()
		fd := -1
		bpftest.InCgroup(t, cg, func() {
			if err := netnsutil.Do(ns, func() error {
				var err error
				if fd, err = socket(unix.AF_INET6, unix.SOCK_DGRAM); err != nil {
					return err
				}
				_, sa := sockaddr(udpVIP)
				return unix.Connect(fd, sa)
			}); err != nil {
				t.Fatal(err)
			}
		})
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	fd := connect()
	var liveAt func(when string, fd int)
	live := func(when string) { t.Helper(); liveAt(when, fd) }
	liveAt = func(when string, fd int) {
		t.Helper()
		p, err := unix.Getpeername(fd)
		if err != nil {
			t.Fatalf("%s: getpeername: %v", when, err)
		}
		if got := saString(p); got != udpVIP {
			t.Errorf("%s: live socket's getpeername = %s, want the VIP %s", when, got, udpVIP)
		}
		if _, err := unix.Write(fd, []byte("q")); err != nil {
			t.Fatalf("%s: send: %v", when, err)
		}
		a := udpRecv(fd, attempt{})
		if a.Errno != "" || a.Server != usrv.Addr || a.From != udpVIP {
			t.Errorf("%s: live socket's reply %+v, want %s from the VIP %s", when, a, usrv.Addr, udpVIP)
		}
	}
	live("before the upgrade")

	oldRev := bpftest.MapID(t, first.objs.KebpfLbRev)
	oldBe := bpftest.MapID(t, first.objs.KebpfLbBe)
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}

	second, err := Load(pinDir, v2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Close() })
	checkServices(t, second, svcs)
	// Until Attach the old programs run, on the old maps: a socket
	// connected now has its rev-NAT entry in the old map only, and keeps
	// its VIP after Attach only through the catch-up.
	live("between Load and Attach")
	late := connect()
	liveAt("connected between Load and Attach", late)
	if err := second.Attach(cg); err != nil {
		t.Fatal(err)
	}
	live("after the upgrade")
	liveAt("connected between Load and Attach, after the upgrade", late)
	res := runChild(t, cg, ns, op{Kind: "tcp", Dst: tcpVIP, Count: 3}, op{Kind: "udpconn", Dst: udpVIP, Count: 3})
	checkFlow(t, res[0], flowWant{Servers: addrs(srv), Peer: tcpVIP})
	checkFlow(t, res[1], flowWant{Servers: addrs(usrv), Peer: udpVIP, From: udpVIP})

	for name, want := range map[string]uint32{SocklbMapKebpfLbSvc4: 64, SocklbMapKebpfLbBe: 128, SocklbMapKebpfLbRev: 1024} {
		m, err := ebpf.LoadPinnedMap(MapPinDir(pinDir)+"/"+name, nil)
		if err != nil {
			t.Fatal(err)
		}
		if m.MaxEntries() != want {
			t.Errorf("pinned %s: max_entries %d, want %d", name, m.MaxEntries(), want)
		}
		m.Close()
	}
	bpftest.WaitMapFreed(t, SocklbMapKebpfLbRev, oldRev)
	bpftest.WaitMapFreed(t, SocklbMapKebpfLbBe, oldBe)
	ents, err := os.ReadDir(MapPinDir(pinDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), pins.TempPin("")) {
			t.Errorf("temporary pin left: %s", e.Name())
		}
	}
	for _, name := range []string{SocklbMapKebpfLbSvc4, SocklbMapKebpfLbSvc6, SocklbMapKebpfLbBe, SocklbMapKebpfLbRev} {
		if !strings.Contains(logs.String(), `msg="pinned map migrated to a new layout" map=`+name) {
			t.Errorf("no migration logged for %s:\n%s", name, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "map="+SocklbMapKebpfLbRev+" policy=migrate+catch-up") ||
		!strings.Contains(logs.String(), "copied=1 catch_up=1") {
		t.Errorf("rev-NAT migration not logged with 1 copied and 1 caught up:\n%s", logs.String())
	}
	if strings.Contains(logs.String(), "map="+SocklbMapKebpfLbAff) {
		t.Errorf("the unchanged affinity map was migrated:\n%s", logs.String())
	}
	t.Logf("logs:\n%s", logs.String())

	// The check can tell a migration from a flush: without its rev-NAT
	// entry the live socket shows the backend.
	if err := pins.ClearMap(second.objs.KebpfLbRev); err != nil {
		t.Fatal(err)
	}
	if p, err := unix.Getpeername(fd); err != nil || saString(p) == udpVIP {
		t.Errorf("getpeername after a rev-NAT flush = %v, %v: the checks above cannot tell a migration from a flush", p, err)
	}
}
