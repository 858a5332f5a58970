//go:build linux

package netpol

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
)

// l7Rig is the real-packet L7 setup: the netpol topology (pods a and b
// behind a routing node netns n, programs on the host-side veths) plus the
// sockmap datapath attached at a test cgroup, whose children are the
// clients' cgroup (app) and Envoy's pod cgroup (registered) with a
// container cgroup below it, where the stand-in Envoy runs: a Go listener
// in the node netns on ipNA:15001 that reads SO_ORIGINAL_DST and proxies
// to it, as Envoy's original_dst listener and ORIGINAL_DST cluster do.
type l7Rig struct {
	tp        *topo
	np        *Objects
	sm        *sockmap.Objects
	app       string // clients' cgroup (hooked)
	envoyCtr  string // the stand-in's container cgroup, below the registered pod cgroup
	envoyAddr netip.AddrPort

	mu      sync.Mutex
	proxied []netip.AddrPort // SO_ORIGINAL_DST of every accepted connection
}

const envoyPort = 15001

func newL7Rig(t *testing.T, tp *topo, mode AttachMode) *l7Rig {
	t.Helper()
	r := &l7Rig{tp: tp, envoyAddr: netip.AddrPortFrom(addr(ipNA), envoyPort)}
	pinDir := nodePinDir(t, tp)
	r.np = loadIn(t, tp, pinDir, mode)
	t.Cleanup(func() { r.np.Close() })
	if err := r.np.SetHostIPs([]netip.Addr{addr(ipNA), addr(ipNB), addr("fd00:125::a:1"), addr("fd00:125::b:1")}); err != nil {
		t.Fatal(err)
	}

	cg := bpftest.Cgroup(t)
	r.app = bpftest.SubCgroup(t, cg, "app")
	envoyPod := bpftest.SubCgroup(t, cg, "envoypod")
	r.envoyCtr = bpftest.SubCgroup(t, envoyPod, "envoy")
	sm, err := sockmap.Load(pinDir) // after netpol: reuses the shared maps it pinned
	if err != nil {
		t.Fatal(err)
	}
	r.sm = sm
	t.Cleanup(func() { sm.Close() })
	if err := sm.Attach(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sockmap.DetachPinned(pinDir); err != nil {
			t.Errorf("detach sockmap: %v", err)
		}
	})
	if err := sm.AddEnvoyCgroup(bpftest.CgroupID(t, envoyPod)); err != nil {
		t.Fatal(err)
	}
	if err := sm.SetEnvoy(sockmap.Envoy{Listener: r.envoyAddr}); err != nil {
		t.Fatal(err)
	}
	r.startEnvoy(t)
	return r
}

// startEnvoy runs the stand-in Envoy until the test ends.
func (r *l7Rig) startEnvoy(t *testing.T) {
	t.Helper()
	var ln net.Listener
	bpftest.InCgroup(t, r.envoyCtr, func() {
		if err := inNetns(r.tp.n, func() error {
			var err error
			ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", envoyPort))
			return err
		}); err != nil {
			t.Fatalf("stand-in Envoy listen: %v", err)
		}
	})
	var wg sync.WaitGroup
	var conns sync.Map
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, nil)
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.proxy(t, c.(*net.TCPConn), &conns)
			}()
		}
	}()
}

// proxy serves one accepted connection like Envoy: SO_ORIGINAL_DST, an
// upstream connection from Envoy's cgroup in the node netns, bytes copied
// both ways.
func (r *l7Rig) proxy(t *testing.T, c *net.TCPConn, conns *sync.Map) {
	dst, err := soOriginalDst(c)
	if err != nil {
		t.Errorf("stand-in Envoy: SO_ORIGINAL_DST: %v", err)
		c.Close()
		return
	}
	r.mu.Lock()
	r.proxied = append(r.proxied, dst)
	r.mu.Unlock()
	up, err := r.envoyDial(t, dst)
	if err != nil {
		t.Errorf("stand-in Envoy: upstream %s: %v", dst, err)
		c.Close()
		return
	}
	conns.Store(up, nil)
	// Plain read/write, as Envoy does: io.Copy between two TCPConns would
	// splice(2), and splice reads the TCP receive queue, never the bytes
	// sk_msg redirected into the socket (measured here: it blocks forever).
	done := make(chan struct{})
	go func() {
		io.Copy(struct{ io.Writer }{up}, struct{ io.Reader }{c})
		up.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(struct{ io.Writer }{c}, struct{ io.Reader }{up})
	c.CloseWrite()
	<-done
	c.Close()
	up.Close()
}

// envoyDial connects from Envoy's container cgroup in the node netns: what
// Envoy's upstream (ORIGINAL_DST cluster) connection does.
func (r *l7Rig) envoyDial(t testing.TB, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	var err error
	bpftest.InCgroup(t, r.envoyCtr, func() {
		err = inNetns(r.tp.n, func() error {
			var derr error
			c, derr = net.DialTimeout("tcp", dst.String(), allowWait)
			return derr
		})
	})
	return c, err
}

func (r *l7Rig) proxiedTo() []netip.AddrPort {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]netip.AddrPort(nil), r.proxied...)
}

// soOriginalDst is getsockopt(SOL_IP, SO_ORIGINAL_DST), as Envoy asks it.
func soOriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var buf [16]byte
	l := uint32(len(buf))
	var serr error
	if err := rc.Control(func(fd uintptr) {
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, 80,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			serr = e
		}
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if serr != nil {
		return netip.AddrPort{}, serr
	}
	if l != 16 || binary.LittleEndian.Uint16(buf[:]) != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("not a sockaddr_in: %x", buf[:l])
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), binary.BigEndian.Uint16(buf[2:4])), nil
}

// dialFromCgroup opens a TCP connection from netns ns with the socket
// created in cgroup cg ("" = the test process's own, outside the hooked
// cgroup) and exchanges one line; it reports where the socket connected.
func dialFromCgroup(t testing.TB, cg, ns, dst string, timeout time.Duration) (remote netip.AddrPort, err error) {
	t.Helper()
	var c net.Conn
	dial := func() {
		err = inNetns(ns, func() error {
			var derr error
			c, derr = net.DialTimeout("tcp", dst, timeout)
			return derr
		})
	}
	if cg == "" {
		dial()
	} else {
		bpftest.InCgroup(t, cg, dial)
	}
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	remote = c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return remote, echo(c, timeout)
}

// newBridgeTopo is newTopo's pods on one bridge (the bridge CNI's layout):
// the node's addresses sit on br0, the host-side veths are its ports, and
// pod-to-pod traffic is bridged, never routed by the node.
func newBridgeTopo(t testing.TB) *topo {
	t.Helper()
	tp := &topo{n: newNetns(t, "n"), a: newNetns(t, "a"), b: newNetns(t, "b")}
	shAll(t, [][]string{
		{"ip", "-n", tp.n, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", tp.n, "link", "add", "va", "master", "br0", "type", "veth", "peer", "name", "eth0", "netns", tp.a},
		{"ip", "-n", tp.n, "link", "add", "vb", "master", "br0", "type", "veth", "peer", "name", "eth0", "netns", tp.b},
		{"ip", "-n", tp.n, "addr", "add", ipNA + "/24", "dev", "br0"},
		{"ip", "-n", tp.n, "addr", "add", ipNB + "/24", "dev", "br0"},
		{"ip", "-n", tp.a, "addr", "add", ipA + "/24", "dev", "eth0"},
		{"ip", "-n", tp.b, "addr", "add", ipB + "/24", "dev", "eth0"},
		{"ip", "-n", tp.n, "link", "set", "br0", "up"},
	})
	tp.up(t)
	shAll(t, [][]string{
		{"ip", "-n", tp.a, "route", "add", "default", "via", ipNA},
		{"ip", "-n", tp.b, "route", "add", "default", "via", ipNA},
	})
	return tp
}

// TestL7NeverWidens: with real packets, steering a pod's connection to the
// node-local Envoy keeps every L3/L4 verdict it had without steering: the
// same client, pair and policies give the same result with the destination
// steered (judged on the original pair on the client leg) as without; a
// connection to the steered pod:port that bypasses Envoy is dropped at the
// destination; Envoy's own upstream connection passes (its socket is still
// on the skb at tcx egress of the host-side veth). Pods routed by the node
// and pods on a bridge; tcx and clsact.
func TestL7NeverWidens(t *testing.T) {
	bpftest.RequireRoot(t)
	for _, tc := range []struct {
		name string
		topo func(testing.TB) *topo
	}{{"routed", newTopo}, {"bridge", newBridgeTopo}} {
		for _, mode := range []AttachMode{AttachTCX, AttachClsact} {
			t.Run(tc.name+"/"+mode.String(), func(t *testing.T) { testL7NeverWidens(t, tc.topo(t), mode) })
		}
	}
}

func testL7NeverWidens(t *testing.T, tp *topo, mode AttachMode) {
	serve(t, tp.b)
	b80, b81 := hostPort(ipB, 80), hostPort(ipB, 81)
	if _, err := dialTCP(t, tp.a, b80, allowWait); err != nil {
		t.Fatalf("topology broken before any policy: %v", err)
	}
	r := newL7Rig(t, tp, mode)
	steeredDst := netip.MustParseAddrPort(b80)

	aOut := func(ports ...uint16) []PeerEntry {
		var rs []PortRule
		for _, p := range ports {
			rs = append(rs, rule(TCP, p, 0, 11, 0))
		}
		return []PeerEntry{peer(ipB+"/32", rs...)}
	}
	bIn := func(from string, ports ...uint16) []PeerEntry {
		var rs []PortRule
		for _, p := range ports {
			rs = append(rs, rule(TCP, p, 0, 21, 0))
		}
		return []PeerEntry{peer(from+"/32", rs...)}
	}
	type pols struct{ a, b EndpointPolicy }
	mk := func(aEgr, bIng []PeerEntry) pols {
		return pols{
			a: EndpointPolicy{ID: 1, IfIndex: tp.ifA, IPs: []netip.Addr{addr(ipA), addr(ip6A)}, EgressEnforced: aEgr != nil, DefaultDenyPolicy: 10, Egress: aEgr},
			b: EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB), addr(ip6B)}, IngressEnforced: bIng != nil, DefaultDenyPolicy: 20, Ingress: bIng},
		}
	}
	rows := []struct {
		name   string
		pols   pols
		wantOK bool
		// counter expected to move on the steered attempt
		counter func(L7Counters) uint64
	}{
		{"allowed pair", mk(aOut(80), bIn(ipA, 80)), true, func(c L7Counters) uint64 { return c.Allowed }},
		{"nothing enforced", mk(nil, nil), true, func(c L7Counters) uint64 { return c.Allowed }},
		{"client egress denies the destination", mk(aOut(81), bIn(ipA, 80)), false, func(c L7Counters) uint64 { return c.DeniedEgress }},
		{"destination ingress denies the client", mk(aOut(80), bIn("10.125.0.99", 80)), false, func(c L7Counters) uint64 { return c.DeniedIngress }},
		{"destination denies, client has no policy", mk(nil, bIn(ipA, 81)), false, func(c L7Counters) uint64 { return c.DeniedIngress }},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			applyIn(t, tp, r.np, row.pols.a)
			applyIn(t, tp, r.np, row.pols.b)
			wait := allowWait
			if !row.wantOK {
				wait = denyWait
			}
			// Without steering: the L3/L4 verdict.
			if err := r.sm.DeleteSteered(steeredDst); err != nil {
				t.Fatal(err)
			}
			remote, err := dialFromCgroup(t, r.app, tp.a, b80, wait)
			if (err == nil) != row.wantOK {
				t.Fatalf("direct a->%s: err=%v, want ok=%v (L3/L4 baseline)", b80, err, row.wantOK)
			}
			if err == nil && remote != steeredDst {
				t.Fatalf("unsteered connect went to %s", remote)
			}
			// With steering: the same verdict, judged on the client leg.
			if err := r.sm.SetSteered(steeredDst); err != nil {
				t.Fatal(err)
			}
			before, smBefore, proxiedBefore := l7Counters(t, r.np), smStats(t, r.sm), len(r.proxiedTo())
			remote, err = dialFromCgroup(t, r.app, tp.a, b80, wait)
			if (err == nil) != row.wantOK {
				t.Fatalf("steered a->%s: err=%v, want ok=%v as without steering (L7 %+v -> %+v, sockmap %+v -> %+v, Envoy proxied %v)",
					b80, err, row.wantOK, before, l7Counters(t, r.np), smBefore, smStats(t, r.sm), r.proxiedTo())
			}
			after, smAfter := l7Counters(t, r.np), smStats(t, r.sm)
			if smAfter.Steered <= smBefore.Steered {
				t.Fatalf("connect not steered: sockmap stats %+v", smAfter)
			}
			if row.counter(after) <= row.counter(before) {
				t.Errorf("L7 counters %+v -> %+v: the expected one did not move", before, after)
			}
			if !row.wantOK {
				if after.Allowed != before.Allowed || len(r.proxiedTo()) != proxiedBefore {
					t.Errorf("denied pair reached Envoy: L7 %+v -> %+v, proxied %v", before, after, r.proxiedTo())
				}
				return
			}
			if remote != r.envoyAddr {
				t.Fatalf("steered connect went to %s, want Envoy %s", remote, r.envoyAddr)
			}
			p := r.proxiedTo()
			if len(p) != proxiedBefore+1 || p[len(p)-1] != steeredDst {
				t.Fatalf("stand-in Envoy saw original destinations %v, want one more %s", p, steeredDst)
			}
			if smAfter.Redirected <= smBefore.Redirected || smAfter.OrigDst <= smBefore.OrigDst {
				t.Errorf("sockmap stats %+v -> %+v: payload not redirected or SO_ORIGINAL_DST not answered", smBefore, smAfter)
			}
			if after.Envoy <= before.Envoy {
				t.Errorf("L7 counters %+v -> %+v: Envoy's upstream SYN not seen as Envoy's", before, after)
			}
		})
	}

	// Bypass: b:80 steered, both policies allow a -> b:80 and b:81.
	applyIn(t, tp, r.np, mk(aOut(80, 81), bIn(ipA, 80, 81)).a)
	applyIn(t, tp, r.np, mk(aOut(80, 81), bIn(ipA, 80, 81)).b)
	if err := r.sm.SetSteered(steeredDst); err != nil {
		t.Fatal(err)
	}
	bypass := []struct {
		name, cg, ns, dst string
		wantOK            bool
		bypassed          bool
	}{
		{"pod socket outside the hooked cgroup -> steered pod:port", "", tp.a, b80, false, true},
		{"node socket outside the hooked cgroup -> steered pod:port", "", tp.n, b80, false, true},
		{"pod socket outside the hooked cgroup -> unsteered port", "", tp.a, b81, true, false},
		{"node socket outside the hooked cgroup -> unsteered port", "", tp.n, b81, true, false},
		{"Envoy's own socket (node netns) -> steered pod:port", r.envoyCtr, tp.n, b80, true, false},
	}
	for _, row := range bypass {
		t.Run(row.name, func(t *testing.T) {
			wait := allowWait
			if !row.wantOK {
				wait = denyWait
			}
			before := l7Counters(t, r.np)
			remote, err := dialFromCgroup(t, row.cg, row.ns, row.dst, wait)
			if (err == nil) != row.wantOK {
				t.Fatalf("%s: err=%v, want ok=%v", row.dst, err, row.wantOK)
			}
			if err == nil && remote.String() != row.dst {
				t.Fatalf("connected to %s, want %s directly (steered?)", remote, row.dst)
			}
			after := l7Counters(t, r.np)
			if row.bypassed && after.Bypass <= before.Bypass {
				t.Errorf("L7 counters %+v -> %+v: bypass not counted", before, after)
			}
			if !row.bypassed && after.Bypass != before.Bypass {
				t.Errorf("L7 counters %+v -> %+v: counted as a bypass", before, after)
			}
		})
	}
	if t.Failed() {
		return
	}
	// A socket of another netns is never Envoy's, even in a registered
	// cgroup (outside the hooked one, so not steered): its skb lost the
	// socket when it crossed from the pod's netns, routed (ip_rcv orphans
	// it) and bridged alike (measured on 6.18: dropped as a bypass).
	probe := bpftest.Cgroup(t)
	if err := r.sm.AddEnvoyCgroup(bpftest.CgroupID(t, probe)); err != nil {
		t.Fatal(err)
	}
	before := l7Counters(t, r.np)
	if _, err := dialFromCgroup(t, probe, tp.a, b80, denyWait); err == nil {
		t.Errorf("pod a's socket in a registered Envoy cgroup reached %s: skb->sk survived the netns crossing", b80)
	}
	if after := l7Counters(t, r.np); after.Bypass <= before.Bypass || after.Envoy != before.Envoy {
		t.Errorf("L7 counters %+v -> %+v: want a bypass, not Envoy", before, after)
	}
	if err := r.sm.DeleteEnvoyCgroup(bpftest.CgroupID(t, probe)); err != nil {
		t.Fatal(err)
	}

	ev, err := r.np.Verdicts()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, v := range ev {
		if v.Reason == ReasonL7Bypass && v.Verdict == VerdictDeny && v.Endpoint == 2 {
			found = true
		}
	}
	if !found {
		t.Errorf("no L7 bypass verdict for endpoint 2 in %+v", ev)
	}
}

func smStats(t testing.TB, o *sockmap.Objects) sockmap.Stats {
	t.Helper()
	s, err := o.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
