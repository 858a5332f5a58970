//go:build linux

package sockmap

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// rig is a steering datapath attached at a fresh cgroup with two children:
// app (clients) and envoy (the stand-in proxy, registered as Envoy's cgroup).
type rig struct {
	o        *Objects
	pinDir   string
	cg       string
	app      string
	envoy    string
	envoyLn  net.Listener // in the envoy cgroup, the steering target
	pod      net.Listener // the "pod": a plain listener in the root cgroup
	podAddr  netip.AddrPort
	envoyAdr netip.AddrPort
}

func inCgroup(tb testing.TB, dir string, fn func()) { tb.Helper(); bpftest.InCgroup(tb, dir, fn) }

func subCgroup(tb testing.TB, parent, name string) string {
	tb.Helper()
	return bpftest.SubCgroup(tb, parent, name)
}

func cgroupID(tb testing.TB, dir string) uint64 { tb.Helper(); return bpftest.CgroupID(tb, dir) }

func listen(tb testing.TB, addr string) net.Listener {
	tb.Helper()
	ln, err := net.Listen("tcp4", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

func addrPort(a net.Addr) netip.AddrPort {
	return a.(*net.TCPAddr).AddrPort()
}

// newRig loads and attaches; everything is detached and removed at cleanup.
func newRig(tb testing.TB) *rig { tb.Helper(); return newRigWith(tb, nil) }

// newRigWith is newRig with before run on the cgroup ahead of Attach (to
// attach the socket LB first, as the agent does).
func newRigWith(tb testing.TB, before func(cg string)) *rig {
	tb.Helper()
	bpftest.RequireRoot(tb)
	r := &rig{pinDir: bpftest.PinDir(tb), cg: bpftest.Cgroup(tb)}
	if before != nil {
		before(r.cg)
	}
	r.app = subCgroup(tb, r.cg, "app")
	r.envoy = subCgroup(tb, r.cg, "envoy")
	o, err := Load(r.pinDir)
	if err != nil {
		tb.Fatal(err)
	}
	r.o = o
	tb.Cleanup(func() { o.Close() })
	if err := o.Attach(r.cg); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := DetachPinned(r.pinDir); err != nil {
			tb.Errorf("detach pinned: %v", err)
		}
	})
	// The "pod" on 127.0.0.2 (the whole 127/8 is local), outside the cgroup.
	r.pod = listen(tb, "127.0.0.2:0")
	r.podAddr = addrPort(r.pod.Addr())
	inCgroup(tb, r.envoy, func() { r.envoyLn = listen(tb, "127.0.0.1:0") })
	r.envoyAdr = addrPort(r.envoyLn.Addr())
	r.program(tb, o)
	return r
}

// program registers the rig's Envoy (cgroup, listener) and steers its pod.
func (r *rig) program(tb testing.TB, o *Objects) {
	tb.Helper()
	if err := o.AddEnvoyCgroup(cgroupID(tb, r.envoy)); err != nil {
		tb.Fatal(err)
	}
	if err := o.SetEnvoy(Envoy{Listener: r.envoyAdr}); err != nil {
		tb.Fatal(err)
	}
	if err := o.SetSteered(r.podAddr); err != nil {
		tb.Fatal(err)
	}
}

// dialFrom dials dst with the socket created in cgroup dir.
func dialFrom(tb testing.TB, dir string, dst netip.AddrPort) (net.Conn, error) {
	tb.Helper()
	var (
		c   net.Conn
		err error
	)
	inCgroup(tb, dir, func() {
		c, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
	})
	if err == nil {
		tb.Cleanup(func() { c.Close() })
	}
	return c, err
}

// accept accepts one connection within 5 s.
func accept(tb testing.TB, ln net.Listener) *net.TCPConn {
	tb.Helper()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		tb.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
	tb.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// getsockopt is the raw syscall with a buffer of n bytes: what Envoy does.
func getsockopt(tb testing.TB, c syscall.Conn, level, name, n int) ([]byte, error) {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	buf := make([]byte, n)
	l := uint32(n)
	var serr error
	if err := rc.Control(func(fd uintptr) {
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(name),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			serr = e
		}
	}); err != nil {
		tb.Fatal(err)
	}
	return buf[:l], serr
}

// origDst is getsockopt(SOL_IP, SO_ORIGINAL_DST) decoded.
func origDst(tb testing.TB, c syscall.Conn) (netip.AddrPort, error) {
	tb.Helper()
	b, err := getsockopt(tb, c, unix.SOL_IP, soOriginalDst, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if len(b) != 16 || binary.LittleEndian.Uint16(b) != unix.AF_INET {
		return netip.AddrPort{}, errors.New("not a sockaddr_in: " + strconv.Quote(string(b)))
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
}

const soOriginalDst = 80

func stats(tb testing.TB, o *Objects) Stats {
	tb.Helper()
	s, err := o.Stats()
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// waitFor polls cond for up to 3 s.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	tb.Fatalf("timed out waiting for %s", what)
}

// dialMapped connects an AF_INET6 socket created in cgroup dir to the
// v4-mapped form of dst (what dual-stack runtimes such as Java do).
func dialMapped(tb testing.TB, dir string, dst netip.AddrPort) (net.Conn, error) {
	tb.Helper()
	var (
		fd  int
		err error
	)
	inCgroup(tb, dir, func() { fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0) })
	if err != nil {
		tb.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "mapped")
	defer f.Close()
	sa := &unix.SockaddrInet6{Port: int(dst.Port()), Addr: netip.AddrFrom16(dst.Addr().As16()).As16()}
	if err := unix.Connect(fd, sa); err != nil {
		return nil, err
	}
	c, err := net.FileConn(f)
	if err == nil {
		tb.Cleanup(func() { c.Close() })
	}
	return c, err
}

// origDst6 is getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) decoded.
func origDst6(tb testing.TB, c syscall.Conn) (netip.AddrPort, error) {
	tb.Helper()
	b, err := getsockopt(tb, c, unix.SOL_IPV6, soOriginalDst, 28)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if len(b) != 28 || binary.LittleEndian.Uint16(b) != unix.AF_INET6 {
		return netip.AddrPort{}, errors.New("not a sockaddr_in6: " + strconv.Quote(string(b)))
	}
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:4])), nil
}
