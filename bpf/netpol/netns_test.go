//go:build linux

package netpol

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// topo is two "pods" (netns a and b) whose veths end in a third netns n
// acting as the node, which routes between them:
//
//	a: eth0 10.125.0.2/28  fd00:125::a:2/112  <->  n: va 10.125.0.1/28  fd00:125::a:1/112
//	b: eth0 10.125.0.18/28 fd00:125::b:2/112  <->  n: vb 10.125.0.17/28 fd00:125::b:1/112
type topo struct {
	n, a, b  string // netns names
	ifA, ifB int    // host-side ifindex in n
}

const (
	ipA  = "10.125.0.2"
	ipB  = "10.125.0.18"
	ipNA = "10.125.0.1"
	ipNB = "10.125.0.17"
	ip6A = "fd00:125::a:2"
	ip6B = "fd00:125::b:2"
)

func sh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newNetns(t testing.TB, role string) string {
	t.Helper()
	return bpftest.Netns(t, "kebpf-np-"+role)
}

func newTopo(t testing.TB) *topo {
	t.Helper()
	tp := &topo{n: newNetns(t, "n"), a: newNetns(t, "a"), b: newNetns(t, "b")}
	// No duplicate address detection: v6 addresses usable at once.
	for _, ns := range []string{tp.n, tp.a, tp.b} {
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
	}
	shAll(t, [][]string{
		{"ip", "-n", tp.n, "link", "add", "va", "type", "veth", "peer", "name", "eth0", "netns", tp.a},
		{"ip", "-n", tp.n, "link", "add", "vb", "type", "veth", "peer", "name", "eth0", "netns", tp.b},
		{"ip", "-n", tp.n, "addr", "add", ipNA + "/28", "dev", "va"},
		{"ip", "-n", tp.n, "addr", "add", ipNB + "/28", "dev", "vb"},
		{"ip", "-n", tp.n, "addr", "add", "fd00:125::a:1/112", "dev", "va", "nodad"},
		{"ip", "-n", tp.n, "addr", "add", "fd00:125::b:1/112", "dev", "vb", "nodad"},
		{"ip", "-n", tp.a, "addr", "add", ipA + "/28", "dev", "eth0"},
		{"ip", "-n", tp.b, "addr", "add", ipB + "/28", "dev", "eth0"},
		{"ip", "-n", tp.a, "addr", "add", ip6A + "/112", "dev", "eth0", "nodad"},
		{"ip", "-n", tp.b, "addr", "add", ip6B + "/112", "dev", "eth0", "nodad"},
	})
	tp.up(t)
	shAll(t, [][]string{
		{"ip", "-n", tp.a, "route", "add", "default", "via", ipNA},
		{"ip", "-n", tp.b, "route", "add", "default", "via", ipNB},
		{"ip", "-n", tp.a, "-6", "route", "add", "default", "via", "fd00:125::a:1"},
		{"ip", "-n", tp.b, "-6", "route", "add", "default", "via", "fd00:125::b:1"},
		{"ip", "netns", "exec", tp.n, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
		{"ip", "netns", "exec", tp.n, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
	})
	return tp
}

// up sets the veths (host side va, vb; pod side eth0) and the pods'
// loopbacks up, and records the host-side ifindexes.
func (tp *topo) up(t testing.TB) {
	t.Helper()
	shAll(t, [][]string{
		{"ip", "-n", tp.n, "link", "set", "va", "up"},
		{"ip", "-n", tp.n, "link", "set", "vb", "up"},
		{"ip", "-n", tp.a, "link", "set", "eth0", "up"},
		{"ip", "-n", tp.b, "link", "set", "eth0", "up"},
		{"ip", "-n", tp.a, "link", "set", "lo", "up"},
		{"ip", "-n", tp.b, "link", "set", "lo", "up"},
	})
	tp.ifA = ifindexIn(t, tp.n, "va")
	tp.ifB = ifindexIn(t, tp.n, "vb")
}

// shAll runs each command with sh.
func shAll(t testing.TB, cmds [][]string) {
	t.Helper()
	for _, c := range cmds {
		sh(t, c...)
	}
}

func ifindexIn(t testing.TB, ns, dev string) int {
	t.Helper()
	var links []struct {
		Ifindex int `json:"ifindex"`
	}
	if err := json.Unmarshal([]byte(sh(t, "ip", "-n", ns, "-j", "link", "show", "dev", dev)), &links); err != nil || len(links) != 1 {
		t.Fatalf("ifindex of %s in %s: %v", dev, ns, err)
	}
	return links[0].Ifindex
}

// nodePinDir is a pin dir on a private bpffs; at cleanup its datapath is
// removed from the node netns (DetachPinned sweeps the clsact filters of
// the caller's netns, which must not be the host's).
func nodePinDir(t testing.TB, tp *topo) string {
	t.Helper()
	pinDir := bpftest.PinDir(t)
	t.Cleanup(func() { inNetns(tp.n, func() error { return DetachPinned(pinDir) }) })
	return pinDir
}

// inNetns runs fn on a thread inside netns name. Sockets created there stay
// in that netns after fn returns; so do ifindex-based attachments.
func inNetns(name string, fn func() error) error {
	return netnsutil.Do(netnsutil.Path(name), fn)
}

// serve starts TCP echo servers on ports 80 and 81 and a UDP echo server on
// port 53 in netns ns (all addresses).
func serve(t testing.TB, ns string) {
	t.Helper()
	var closers []io.Closer
	err := inNetns(ns, func() error {
		for _, port := range []string{"80", "81"} {
			l, err := net.Listen("tcp", ":"+port)
			if err != nil {
				return err
			}
			closers = append(closers, l)
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					go func() {
						defer c.Close()
						r := bufio.NewReader(c)
						for {
							line, err := r.ReadString('\n')
							if err != nil {
								return
							}
							if _, err := c.Write([]byte(line)); err != nil {
								return
							}
						}
					}()
				}
			}()
		}
		u, err := net.ListenPacket("udp", ":53")
		if err != nil {
			return err
		}
		closers = append(closers, u)
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := u.ReadFrom(buf)
				if err != nil {
					return
				}
				u.WriteTo(buf[:n], from)
			}
		}()
		return nil
	})
	if err != nil {
		t.Fatalf("serve in %s: %v", ns, err)
	}
	t.Cleanup(func() {
		for _, c := range closers {
			c.Close()
		}
	})
}

// dialTCP connects from netns ns to dst and exchanges one line.
func dialTCP(t testing.TB, ns, dst string, timeout time.Duration) (net.Conn, error) {
	t.Helper()
	var conn net.Conn
	err := inNetns(ns, func() error {
		c, err := net.DialTimeout("tcp", dst, timeout)
		if err != nil {
			return err
		}
		conn = c
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := echo(conn, timeout); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

func echo(c net.Conn, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "ping\n" {
		return fmt.Errorf("echo %q", line)
	}
	return nil
}

// probeTCP reports whether a new TCP connection from ns to dst works.
func probeTCP(t testing.TB, ns, dst string, timeout time.Duration) bool {
	t.Helper()
	c, err := dialTCP(t, ns, dst, timeout)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// probeUDP sends one datagram from a new socket in ns and waits for the echo.
func probeUDP(t testing.TB, ns, dst string, timeout time.Duration) bool {
	t.Helper()
	var conn net.Conn
	if err := inNetns(ns, func() error {
		c, err := net.Dial("udp", dst)
		conn = c
		return err
	}); err != nil {
		t.Fatalf("udp socket: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte("q")); err != nil {
		return false
	}
	buf := make([]byte, 16)
	n, err := conn.Read(buf)
	return err == nil && string(buf[:n]) == "q"
}

func hostPort(ip string, port int) string {
	return netip.AddrPortFrom(addr(ip), uint16(port)).String()
}

// bpftoolIn runs bpftool in netns ns.
func bpftoolIn(t testing.TB, ns string, args ...string) string {
	t.Helper()
	return sh(t, append([]string{"ip", "netns", "exec", ns, "bpftool"}, args...)...)
}

// kebpfProgs lists the programs attached through tcx to ifindexes in ns
// whose names start with kebpf_np_ ("ifindex/attach/name/id" strings). The
// installed bpftool (7.1) predates tcx and shows none of them in `net show`,
// so this asks the kernel directly (BPF_PROG_QUERY).
func kebpfProgs(t testing.TB, ns string, ifindexes ...int) []string {
	t.Helper()
	var out []string
	err := inNetns(ns, func() error {
		for _, ifi := range ifindexes {
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: ifi, Attach: at})
				if err != nil {
					return err
				}
				for _, ap := range res.Programs {
					p, err := ebpf.NewProgramFromID(ap.ID)
					if err != nil {
						return err
					}
					info, err := p.Info()
					p.Close()
					if err != nil {
						return err
					}
					if strings.HasPrefix(info.Name, "kebpf_np_") {
						out = append(out, fmt.Sprintf("%d/%s/%s/%d", ifi, at, info.Name, ap.ID))
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs: %v", err)
	}
	return out
}
