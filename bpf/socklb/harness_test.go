//go:build linux

package socklb

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// The test binary re-executes itself as the client: it starts inside the
// test cgroup (CLONE_INTO_CGROUP), enters the test netns, does the socket
// calls with raw syscalls on one locked thread and prints JSON results.
const (
	childEnv = "KEBPF_SOCKLB_CHILD"
)

// op is one client action, repeated Count times.
type op struct {
	// Kind: "tcp" (connect, getpeername, read identity), "udp" (sendto +
	// recvfrom on an unconnected socket), "udpmany" (Count of those on one
	// socket), "udpconn" (connect, getpeername,
	// send, recvfrom), "hold" (interactive destroy scenario, see holdUDP),
	// "bench-udp"/"bench-tcp" (Count connects, report elapsed ns).
	Kind    string
	Dst     string
	Count   int
	SleepMs int
}

type childReq struct {
	Netns string
	Ops   []op
}

// attempt is the outcome of one client action.
type attempt struct {
	Server string            `json:",omitempty"` // identity the server replied with
	Peer   string            `json:",omitempty"` // getpeername()
	From   string            `json:",omitempty"` // recvfrom() source
	Errno  string            `json:",omitempty"` // errno name of the first failing call
	Call   string            `json:",omitempty"` // which call failed
	Ns     int64             `json:",omitempty"` // bench: elapsed
	Extra  map[string]string `json:",omitempty"`
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(childMain(spec))
	}
	os.Exit(m.Run())
}

func childMain(spec string) int {
	var req childReq
	if err := json.Unmarshal([]byte(spec), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	// Every syscall below runs on this thread, which is in the test netns.
	runtime.LockOSThread()
	if req.Netns != "" {
		ns, err := netns.GetFromPath(req.Netns)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		if err := netns.Set(ns); err != nil {
			fmt.Fprintln(os.Stderr, "setns:", err)
			return 2
		}
	}
	out := json.NewEncoder(os.Stdout)
	var results [][]attempt
	for _, o := range req.Ops {
		var res []attempt
		for i := range max(o.Count, 1) {
			if i > 0 && o.SleepMs > 0 {
				time.Sleep(time.Duration(o.SleepMs) * time.Millisecond)
			}
			switch o.Kind {
			case "tcp":
				res = append(res, doTCP(o.Dst))
			case "udp":
				res = append(res, doUDP(o.Dst, false))
			case "udpconn":
				res = append(res, doUDP(o.Dst, true))
			case "hold":
				res = append(res, holdUDP(o.Dst, out))
			case "bench-udp", "bench-tcp":
				res = append(res, bench(o.Kind, o.Dst, o.Count))
			case "udpmany":
				res = append(res, udpMany(o.Dst, o.Count))
			default:
				fmt.Fprintln(os.Stderr, "unknown op", o.Kind)
				return 2
			}
			if strings.HasPrefix(o.Kind, "bench") || o.Kind == "udpmany" {
				break
			}
		}
		results = append(results, res)
	}
	if err := out.Encode(results); err != nil {
		return 2
	}
	return 0
}

func sockaddr(dst string) (int, unix.Sockaddr) {
	ap := netip.MustParseAddrPort(dst)
	if ap.Addr().Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func saString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}

func failed(a attempt, call string, err error) attempt {
	a.Call = call
	var errno unix.Errno
	if errors.As(err, &errno) {
		a.Errno = unix.ErrnoName(errno)
	} else {
		a.Errno = err.Error()
	}
	return a
}

func socket(fam, typ int) (int, error) {
	fd, err := unix.Socket(fam, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return fd, nil
}

// retryEINTR repeats a receive the Go runtime's preemption signal (SIGURG)
// interrupted: with SO_RCVTIMEO set the kernel does not restart it, even
// under SA_RESTART (signal(7)).
func retryEINTR(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if err != unix.EINTR {
			return n, err
		}
	}
}

func doTCP(dst string) attempt {
	var a attempt
	fam, sa := sockaddr(dst)
	fd, err := socket(fam, unix.SOCK_STREAM)
	if err != nil {
		return failed(a, "socket", err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		return failed(a, "connect", err)
	}
	if p, err := unix.Getpeername(fd); err == nil {
		a.Peer = saString(p)
	}
	buf := make([]byte, 128)
	n, err := retryEINTR(func() (int, error) { return unix.Read(fd, buf) })
	if err != nil {
		return failed(a, "read", err)
	}
	a.Server = string(buf[:n])
	return a
}

func doUDP(dst string, connected bool) attempt {
	var a attempt
	fam, sa := sockaddr(dst)
	fd, err := socket(fam, unix.SOCK_DGRAM)
	if err != nil {
		return failed(a, "socket", err)
	}
	defer unix.Close(fd)
	if connected {
		if err := unix.Connect(fd, sa); err != nil {
			return failed(a, "connect", err)
		}
		if p, err := unix.Getpeername(fd); err == nil {
			a.Peer = saString(p)
		}
		if _, err := unix.Write(fd, []byte("q")); err != nil {
			return failed(a, "send", err)
		}
	} else if err := unix.Sendto(fd, []byte("q"), 0, sa); err != nil {
		return failed(a, "sendto", err)
	}
	return udpRecv(fd, a)
}

// udpMany sends n datagrams from one unconnected socket, each answered.
func udpMany(dst string, n int) attempt {
	var a attempt
	fam, sa := sockaddr(dst)
	fd, err := socket(fam, unix.SOCK_DGRAM)
	if err != nil {
		return failed(a, "socket", err)
	}
	defer unix.Close(fd)
	for range max(n, 1) {
		if err := unix.Sendto(fd, []byte("q"), 0, sa); err != nil {
			return failed(a, "sendto", err)
		}
		if a = udpRecv(fd, a); a.Errno != "" {
			return a
		}
	}
	return a
}

func udpRecv(fd int, a attempt) attempt {
	buf := make([]byte, 128)
	var from unix.Sockaddr
	n, err := retryEINTR(func() (n int, err error) {
		n, from, err = unix.Recvfrom(fd, buf, 0)
		return n, err
	})
	if err != nil {
		return failed(a, "recvfrom", err)
	}
	a.Server = string(buf[:n])
	if from != nil {
		a.From = saString(from)
	}
	return a
}

// holdUDP: s1 connects to dst (a UDP service) and learns its backend X; s2
// connects to X directly. It prints a progress line, waits for a line on
// stdin (the parent removes X meanwhile), then reports s1's send and recv
// errors, whether s2 still works, and where a fresh connect to dst goes.
func holdUDP(dst string, out *json.Encoder) attempt {
	a := attempt{Extra: map[string]string{}}
	fam, sa := sockaddr(dst)
	s1, err := socket(fam, unix.SOCK_DGRAM)
	if err != nil {
		return failed(a, "socket", err)
	}
	defer unix.Close(s1)
	if err := unix.Connect(s1, sa); err != nil {
		return failed(a, "connect", err)
	}
	unix.Write(s1, []byte("q"))
	first := udpRecv(s1, attempt{})
	if first.Errno != "" {
		return failed(a, "first recv", errors.New(first.Errno))
	}
	a.Extra["first"] = first.Server
	s2, err := socket(fam, unix.SOCK_DGRAM)
	if err != nil {
		return failed(a, "socket", err)
	}
	defer unix.Close(s2)
	_, xsa := sockaddr(first.Server)
	if err := unix.Connect(s2, xsa); err != nil {
		return failed(a, "connect direct", err)
	}
	out.Encode(map[string]string{"ready": first.Server})
	bufio.NewReader(os.Stdin).ReadString('\n')

	errName := func(err error) string {
		if err == nil {
			return "ok"
		}
		var errno unix.Errno
		if errors.As(err, &errno) {
			return unix.ErrnoName(errno)
		}
		return err.Error()
	}
	// bpf_sock_destroy leaves ECONNABORTED pending (reported once, by the
	// first call that checks it) and disconnects the socket.
	_, _, err = unix.Recvfrom(s1, make([]byte, 64), unix.MSG_DONTWAIT)
	a.Extra["s1recv"] = errName(err)
	_, err = unix.Write(s1, []byte("q"))
	a.Extra["s1send"] = errName(err)
	_, err = unix.Write(s1, []byte("q"))
	a.Extra["s1send2"] = errName(err)
	if p, err := unix.Getpeername(s1); err == nil {
		a.Extra["s1peer"] = saString(p)
	} else {
		a.Extra["s1peer"] = errName(err)
	}
	_, err = unix.Write(s2, []byte("q"))
	a.Extra["s2send"] = errName(err)
	if r := udpRecv(s2, attempt{}); r.Errno != "" {
		a.Extra["s2recv"] = r.Errno
	} else {
		a.Extra["s2recv"] = r.Server
	}
	again := doUDP(dst, true)
	a.Extra["again"] = again.Server + again.Errno
	return a
}

func bench(kind, dst string, n int) attempt {
	var a attempt
	fam, sa := sockaddr(dst)
	typ := unix.SOCK_DGRAM
	if kind == "bench-tcp" {
		typ = unix.SOCK_STREAM
	}
	var total time.Duration
	for range n {
		fd, err := unix.Socket(fam, typ|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return failed(a, "socket", err)
		}
		if typ == unix.SOCK_STREAM {
			// RST on close: no TIME_WAIT, so 100k connects do not run
			// out of ephemeral ports.
			unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		}
		// Only connect() itself is timed: socket() and close() cost the
		// same with and without the programs.
		start := time.Now()
		err = unix.Connect(fd, sa)
		total += time.Since(start)
		unix.Close(fd)
		if err != nil {
			return failed(a, "connect", err)
		}
	}
	a.Ns = total.Nanoseconds()
	return a
}

// --- parent-side helpers -----------------------------------------------

// testNetns creates a netns with only loopback up: anything not
// translated to a loopback backend has no route and cannot leave.
func testNetns(tb testing.TB) string {
	tb.Helper()
	name := bpftest.Netns(tb, "kebpf-test-")
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		tb.Fatalf("lo up in %s: %v\n%s", name, err, out)
	}
	return netnsutil.Path(name)
}

// rootLB starts most root tests: a netns, and the LB loaded and attached
// to a fresh cgroup.
func rootLB(tb testing.TB, opts LoadOptions) (ns string, o *Objects, cg string) {
	tb.Helper()
	bpftest.RequireRoot(tb)
	ns = testNetns(tb)
	o, _, cg = attachLB(tb, opts)
	return ns, o, cg
}

// attachLB loads with a private bpffs and attaches to a fresh cgroup; both
// are torn down (links detached, pins removed) whatever the test does.
func attachLB(tb testing.TB, opts LoadOptions) (*Objects, string, string) {
	tb.Helper()
	pinDir := bpftest.PinDir(tb)
	cg := bpftest.Cgroup(tb)
	o, err := Load(pinDir, opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { o.Close() })
	if err := o.Attach(cg); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := DetachPinned(pinDir); err != nil {
			tb.Errorf("detach pinned: %v", err)
		}
	})
	return o, pinDir, cg
}

// server is a loopback TCP or UDP server in the test netns that replies
// with its own address:port.
type server struct {
	Addr string
}

// startServers starts n servers like startServer.
func startServers(tb testing.TB, netns, network, addr string, n int) []server {
	tb.Helper()
	out := make([]server, n)
	for i := range out {
		out[i] = startServer(tb, netns, network, addr)
	}
	return out
}

func startServer(tb testing.TB, netns, network, addr string) server {
	tb.Helper()
	var s server
	var closer io.Closer
	err := netnsutil.Do(netns, func() error {
		switch network {
		case "tcp":
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			closer, s.Addr = ln, netip.MustParseAddrPort(ln.Addr().String()).String()
			id := []byte(s.Addr)
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Write(id)
					c.Close()
				}
			}()
		case "udp":
			pc, err := net.ListenPacket("udp", addr)
			if err != nil {
				return err
			}
			closer, s.Addr = pc, netip.MustParseAddrPort(pc.LocalAddr().String()).String()
			id := []byte(s.Addr)
			go func() {
				buf := make([]byte, 64)
				for {
					_, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(id, from)
				}
			}()
		}
		return nil
	})
	if err != nil {
		tb.Fatalf("listen %s %s: %v", network, addr, err)
	}
	tb.Cleanup(func() { closer.Close() })
	return s
}

func (s server) backend() Backend {
	ap := netip.MustParseAddrPort(s.Addr)
	return Backend{IP: ap.Addr(), Port: ap.Port()}
}

func backends(ss ...server) []Backend {
	var bs []Backend
	for _, s := range ss {
		bs = append(bs, s.backend())
	}
	return bs
}

func childCmd(tb testing.TB, cgroup string, req childReq) (*exec.Cmd, func()) {
	tb.Helper()
	cg, err := os.Open(cgroup)
	if err != nil {
		tb.Fatal(err)
	}
	spec, _ := json.Marshal(req)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd, func() { cg.Close() }
}

// holder is a client holding UDP sockets (op "hold") until released.
type holder struct {
	tb     testing.TB
	stdin  io.Writer
	dec    *json.Decoder
	stderr *strings.Builder
	// reached is the server the socket through the LB reached first.
	reached string
}

// startHold starts a "hold" client to dst in cgroup+netns and returns once
// its sockets are connected.
func startHold(tb testing.TB, cgroup, netns, dst string) *holder {
	tb.Helper()
	cmd, done := childCmd(tb, cgroup, childReq{Netns: netns, Ops: []op{{Kind: "hold", Dst: dst}}})
	tb.Cleanup(done)
	h := &holder{tb: tb, stderr: &strings.Builder{}}
	h.stdin, _ = cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = h.stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	h.dec = json.NewDecoder(stdout)
	var ready map[string]string
	if err := h.dec.Decode(&ready); err != nil {
		tb.Fatalf("child: %v\n%s", err, h.stderr.String())
	}
	h.reached = ready["ready"]
	return h
}

// release lets the client go on and returns what it saw (holdUDP's Extra).
func (h *holder) release() map[string]string {
	h.tb.Helper()
	io.WriteString(h.stdin, "go\n")
	var res [][]attempt
	if err := h.dec.Decode(&res); err != nil {
		h.tb.Fatalf("child: %v\n%s", err, h.stderr.String())
	}
	return res[0][0].Extra
}

// runChild runs the client in cgroup+netns and returns one []attempt per op.
func runChild(tb testing.TB, cgroup, netns string, ops ...op) [][]attempt {
	tb.Helper()
	cmd, done := childCmd(tb, cgroup, childReq{Netns: netns, Ops: ops})
	defer done()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("child %+v: %v\n%s", ops, err, stderr.String())
	}
	var res [][]attempt
	if err := json.Unmarshal(out, &res); err != nil {
		tb.Fatalf("child output %q: %v", out, err)
	}
	return res
}

func mustApply(tb testing.TB, o *Objects, svc Service) {
	tb.Helper()
	if err := o.Apply(svc); err != nil {
		tb.Fatalf("apply %d: %v", svc.ID, err)
	}
}

func fe(addrPort string, p Proto) Frontend {
	ap := netip.MustParseAddrPort(addrPort)
	return Frontend{IP: ap.Addr(), Port: ap.Port(), Proto: p}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
