//go:build linux

package netpol

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// handleIn is a netlink handle in netns ns: no thread switching.
func handleIn(t testing.TB, ns string) *netlink.Handle {
	t.Helper()
	nsh, err := netns.GetFromPath(netnsutil.Path(ns))
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", ns, err)
	}
	t.Cleanup(h.Close)
	return h
}

// filtersIn dumps the filters of both clsact hooks of ifindex in ns.
func filtersIn(t testing.TB, ns string, ifindex int) []tcFilter {
	t.Helper()
	h := handleIn(t, ns)
	var out []tcFilter
	for _, parent := range clsactParents {
		fs, err := dumpFilters(h, ifindex, parent)
		if err != nil {
			t.Fatalf("dump filters of ifindex %d in %s: %v", ifindex, ns, err)
		}
		out = append(out, fs...)
	}
	return out
}

func dirOf(parent uint32) string {
	if parent == clsactParents[0] {
		return "ingress"
	}
	return "egress"
}

// kebpfFilters lists our clsact filters on ifindexes in ns, as
// "ifindex/hook/name/prio/handle/progID".
func kebpfFilters(t testing.TB, ns string, ifindexes ...int) []string {
	t.Helper()
	var out []string
	for _, ifi := range ifindexes {
		for _, f := range filtersIn(t, ns, ifi) {
			if f.ours() {
				out = append(out, fmt.Sprintf("%d/%s/%s/%d/%#x/%d", ifi, dirOf(f.attrs.Parent), f.name, f.prio(), f.attrs.Handle, f.progID))
			}
		}
	}
	return out
}

// attached checks that the node's veths carry n attachments of ours in
// mode and none in the other mode, and returns mode's.
func attached(t testing.TB, tp *topo, mode AttachMode, n int) []string {
	t.Helper()
	tcx := kebpfProgs(t, tp.n, tp.ifA, tp.ifB)
	cls := kebpfFilters(t, tp.n, tp.ifA, tp.ifB)
	got, other := tcx, cls
	if mode == AttachClsact {
		got, other = cls, tcx
	}
	if len(got) != n {
		t.Errorf("%s attachments: %v, want %d", mode, got, n)
	}
	if len(other) != 0 {
		t.Errorf("attachments of the other mode while in %s: %v", mode, other)
	}
	return got
}

// passProg is a foreign direct-action tc program: TC_ACT_UNSPEC (continue).
func passProg(t testing.TB) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "foreign_pass", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// setFilterIn adds or replaces a cls_bpf filter in ns.
func setFilterIn(t testing.TB, ns string, ifindex int, dir int, prio uint16, handle uint32, prog *ebpf.Program, name string) error {
	t.Helper()
	h := handleIn(t, ns)
	if err := ensureClsact(h, ifindex); err != nil {
		return err
	}
	return setBPFFilter(h, ifindex, clsactParents[dir], prio, handle, prog, name)
}

func progID(t testing.TB, p *ebpf.Program) uint32 {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}

// wantOurs checks there is exactly one filter of ours on each clsact hook
// of ifindex, in our slot, running from (ingress) and to (egress).
func wantOurs(t *testing.T, ns string, ifindex int, from, to *ebpf.Program) {
	t.Helper()
	want := []string{
		fmt.Sprintf("%d/ingress/%s/%d/%#x/%d", ifindex, FromProgramName, ClsactPriority, ClsactHandle, progID(t, from)),
		fmt.Sprintf("%d/egress/%s/%d/%#x/%d", ifindex, ToProgramName, ClsactPriority, ClsactHandle, progID(t, to)),
	}
	if got := kebpfFilters(t, ns, ifindex); !slices.Equal(got, want) {
		t.Errorf("filters of ours on ifindex %d: %v, want %v", ifindex, got, want)
	}
}

func TestAttachModeAPI(t *testing.T) {
	bpftest.RequireRoot(t)
	for _, m := range []AttachMode{AttachAuto, AttachTCX, AttachClsact} {
		got, err := ParseAttachMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseAttachMode(%q) = %v, %v", m, got, err)
		}
		var v AttachMode
		if err := v.Set(m.String()); err != nil || v != m {
			t.Errorf("Set(%q) = %v, %v", m, v, err)
		}
	}
	if _, err := ParseAttachMode("tc"); err == nil {
		t.Error("ParseAttachMode(tc) accepted")
	}
	if !strings.HasPrefix(FromProgramName, clsactNamePrefix) || !strings.HasPrefix(ToProgramName, clsactNamePrefix) {
		t.Errorf("program names %s, %s lack %s: detach would not find the filters", FromProgramName, ToProgramName, clsactNamePrefix)
	}
	// 6.18 has tcx: auto picks it.
	if o := loadMaps(t, "", LoadOptions{}); o.AttachMode() != AttachTCX {
		t.Errorf("AttachAuto resolved to %v on a tcx kernel", o.AttachMode())
	}
	if o := loadMaps(t, "", LoadOptions{Attach: AttachClsact}); o.AttachMode() != AttachClsact {
		t.Errorf("AttachClsact resolved to %v", o.AttachMode())
	}
	if _, err := Load(filepath.Join(bpftest.BPFFS(t), "x"), LoadOptions{Attach: 7}); err == nil {
		t.Error("Load accepted attach mode 7")
	}
}

// clsact filters: coexistence with foreign filters (before us at our own
// priority, after us at others), in-place replacement on re-attach and
// restart, removal of a stray filter of ours, refusal to overwrite a
// foreign filter in our slot, and removal by name from a fresh process.
func TestClsactFilters(t *testing.T) {
	bpftest.RequireRoot(t)
	tp := newTopo(t)
	serve(t, tp.b)
	root := bpftest.BPFFS(t)
	pinDir := filepath.Join(root, "kubectl-ebpf")
	t.Cleanup(func() { inNetns(tp.n, func() error { return DetachPinned(pinDir) }) })

	// Foreign filters, and the qdisc, are there first: a cls_bpf at our
	// priority with another handle (as Cilium's legacy tc mode would
	// have), a cls_bpf at priority 50, a u32 at 100 (no matchall in this kernel).
	fp := passProg(t)
	sh(t, "tc", "-n", tp.n, "qdisc", "add", "dev", "va", "clsact")
	for _, ifi := range []int{tp.ifA, tp.ifB} {
		for dir := range 2 {
			if err := setFilterIn(t, tp.n, ifi, dir, ClsactPriority, 1, fp, "foreign_cni"); err != nil {
				t.Fatal(err)
			}
			if err := setFilterIn(t, tp.n, ifi, dir, 50, 1, fp, "foreign_50"); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, dev := range []string{"va", "vb"} {
		for _, dir := range []string{"ingress", "egress"} {
			sh(t, "tc", "-n", tp.n, "filter", "add", "dev", dev, dir, "prio", "100", "protocol", "all", "u32", "match", "u32", "0", "0")
		}
	}
	foreign := func() []string {
		var out []string
		for _, ifi := range []int{tp.ifA, tp.ifB} {
			for _, f := range filtersIn(t, tp.n, ifi) {
				if !f.ours() {
					out = append(out, fmt.Sprintf("%d/%s/%s/%s/%d/%#x", ifi, dirOf(f.attrs.Parent), f.kind, f.name, f.prio(), f.attrs.Handle))
				}
			}
		}
		return out
	}
	foreignBefore := foreign()
	// (u32 dumps its hash tables and keys too: more than 3 per hook.)
	if len(foreignBefore) < 12 {
		t.Fatalf("foreign filters: %v, want at least 12", foreignBefore)
	}

	o := loadIn(t, tp, pinDir, AttachClsact)
	t.Cleanup(func() { o.Close() })
	bPol := EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB)}, IngressEnforced: true, DefaultDenyPolicy: 20,
		Ingress: []PeerEntry{peer(ipA+"/32", rule(TCP, 80, 0, 21, 0))}}
	aPol := EndpointPolicy{ID: 1, IfIndex: tp.ifA, IPs: []netip.Addr{addr(ipA)}, EgressEnforced: true, DefaultDenyPolicy: 10,
		Egress: []PeerEntry{peer(ipB+"/32", rule(TCP, 80, 81, 11, 0))}}
	applyIn(t, tp, o, bPol)
	applyIn(t, tp, o, aPol)
	enforced := func(t *testing.T, want bool) {
		t.Helper()
		if !probeTCP(t, tp.a, hostPort(ipB, 80), allowWait) {
			t.Error("a->b tcp 80 (allowed) fails")
		}
		if got := probeTCP(t, tp.a, hostPort(ipB, 81), denyWait); got == want {
			t.Errorf("a->b tcp 81 (denied by b ingress) connected=%v, want %v", got, !want)
		}
		if got := probeUDP(t, tp.a, hostPort(ipB, 53), denyWait); got == want {
			t.Errorf("a->b udp 53 (denied by a egress) answered=%v, want %v", got, !want)
		}
	}
	enforced(t, true)
	from, to := o.Programs()
	wantOurs(t, tp.n, tp.ifA, from, to)
	wantOurs(t, tp.n, tp.ifB, from, to)

	// Re-apply: no second filter.
	applyIn(t, tp, o, bPol)
	wantOurs(t, tp.n, tp.ifB, from, to)

	// A stray filter of ours elsewhere (another version's slot) goes at the
	// next attach; a restart replaces ours in place with the new programs.
	if err := setFilterIn(t, tp.n, tp.ifB, 0, 2, 9, from, FromProgramName); err != nil {
		t.Fatal(err)
	}
	if got := kebpfFilters(t, tp.n, tp.ifB); len(got) != 3 {
		t.Fatalf("with the stray: %v", got)
	}
	oldID := progID(t, from)
	if err := o.Close(); err != nil {
		t.Fatal(err)
	}
	enforced(t, true) // no agent: the filters hold their programs
	o2 := loadIn(t, tp, pinDir, AttachClsact)
	t.Cleanup(func() { o2.Close() })
	from2, to2 := o2.Programs()
	if progID(t, from2) == oldID {
		t.Fatal("restart loaded the same program")
	}
	wantOurs(t, tp.n, tp.ifA, from2, to2)
	wantOurs(t, tp.n, tp.ifB, from2, to2)
	enforced(t, true)
	if got := foreign(); !slices.Equal(got, foreignBefore) {
		t.Errorf("foreign filters after attach: %v, want %v", got, foreignBefore)
	}

	// A foreign filter in our slot is never overwritten.
	sh(t, "ip", "-n", tp.n, "link", "add", "vc", "type", "veth", "peer", "name", "vcp")
	ifC := ifindexIn(t, tp.n, "vc")
	if err := setFilterIn(t, tp.n, ifC, 1, ClsactPriority, ClsactHandle, fp, "squatter"); err != nil {
		t.Fatal(err)
	}
	err := inNetns(tp.n, func() error { return o2.ApplyEndpoint(EndpointPolicy{ID: 3, IfIndex: ifC}) })
	if err == nil || !strings.Contains(err.Error(), "foreign") {
		t.Errorf("apply on an interface whose slot a foreign filter holds: %v, want a foreign-filter error", err)
	}
	if fs := filtersIn(t, tp.n, ifC); !slices.ContainsFunc(fs, func(f tcFilter) bool { return f.name == "squatter" && f.inOurSlot() }) {
		t.Errorf("squatter filter touched: %+v", fs)
	}
	if err := inNetns(tp.n, func() error { return o2.DeleteEndpoint(3) }); err != nil {
		t.Fatal(err)
	}

	// Detach from a fresh Objects that attached nothing (its own pins,
	// empty maps): our filters are found by name and removed.
	if err := o2.Close(); err != nil {
		t.Fatal(err)
	}
	o3 := loadIn(t, tp, filepath.Join(root, "other"), AttachClsact)
	if err := inNetns(tp.n, o3.Detach); err != nil {
		t.Fatal(err)
	}
	if got := kebpfFilters(t, tp.n, tp.ifA, tp.ifB); len(got) != 0 {
		t.Errorf("filters of ours after a fresh Detach: %v", got)
	}
	if got := foreign(); !slices.Equal(got, foreignBefore) {
		t.Errorf("foreign filters after Detach: %v, want %v", got, foreignBefore)
	}
	enforced(t, false)

	// DetachPinned (the cleanup, no Objects at all) after a restart that
	// re-attached from the maps.
	o4 := loadIn(t, tp, pinDir, AttachClsact)
	from4, to4 := o4.Programs()
	wantOurs(t, tp.n, tp.ifB, from4, to4)
	enforced(t, true)
	if err := o4.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inNetns(tp.n, func() error { return DetachPinned(pinDir) }); err != nil {
		t.Fatal(err)
	}
	if got := kebpfFilters(t, tp.n, tp.ifA, tp.ifB); len(got) != 0 {
		t.Errorf("filters of ours after DetachPinned: %v", got)
	}
	if got := foreign(); !slices.Equal(got, foreignBefore) {
		t.Errorf("foreign filters after DetachPinned: %v, want %v", got, foreignBefore)
	}
	for _, dev := range []string{"va", "vb"} {
		if out := sh(t, "tc", "-n", tp.n, "qdisc", "show", "dev", dev); !strings.Contains(out, "clsact") {
			t.Errorf("clsact qdisc of %s gone: %s", dev, out)
		}
	}
	enforced(t, false)
	// Nothing left to find: a second cleanup is a no-op.
	if err := inNetns(tp.n, func() error { return DetachPinned(pinDir) }); err != nil {
		t.Fatal(err)
	}
}

// Replacing the filter never leaves the hook empty: a flood of denied UDP
// datagrams from a to b crosses hundreds of re-attaches without one getting
// through. (The flood does see a gap: replacing by delete and add instead
// let about 4400 of 24000 datagrams through in 300 rounds here.)
func TestClsactReplaceNoGap(t *testing.T) {
	bpftest.RequireRoot(t)
	tp := newTopo(t)
	pinDir := nodePinDir(t, tp)

	var received atomic.Int64
	var lc net.PacketConn
	if err := inNetns(tp.b, func() error {
		var err error
		lc, err = net.ListenPacket("udp", ":5454")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	go func() {
		buf := make([]byte, 64)
		for {
			if _, _, err := lc.ReadFrom(buf); err != nil {
				return
			}
			received.Add(1)
		}
	}()
	var conn net.Conn
	if err := inNetns(tp.a, func() error {
		var err error
		conn, err = net.Dial("udp", hostPort(ipB, 5454))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// Reachable before any policy.
	for i := 0; i < 20 && received.Load() == 0; i++ {
		conn.Write([]byte("x"))
		time.Sleep(10 * time.Millisecond)
	}
	if received.Load() == 0 {
		t.Fatal("topology broken before any policy: udp 5454")
	}

	o := loadIn(t, tp, pinDir, AttachClsact)
	t.Cleanup(func() { o.Close() })
	applyIn(t, tp, o, EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB)}, IngressEnforced: true, DefaultDenyPolicy: 20})
	time.Sleep(50 * time.Millisecond) // datagrams in flight before the deny
	received.Store(0)

	var sent atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.Write([]byte("x")); err == nil {
				sent.Add(1)
			}
		}
	}()
	from, to := o.Programs()
	const replaces = 300
	start := time.Now()
	if err := inNetns(tp.n, func() error {
		for range replaces {
			if err := attachClsact(tp.ifB, [2]*ebpf.Program{from, to}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	time.Sleep(50 * time.Millisecond)
	t.Logf("%d replaces in %v while %d denied datagrams were sent", replaces, took, sent.Load())
	if sent.Load() < 1000 {
		t.Fatalf("flood too thin to tell: %d datagrams", sent.Load())
	}
	if n := received.Load(); n != 0 {
		t.Errorf("%d denied datagrams got through while the filter was replaced", n)
	}
	wantOurs(t, tp.n, tp.ifB, from, to)
}

// A pod's interface goes away and comes back with a new ifindex (sandbox
// restart): the re-apply attaches there, detaching the vanished one is not
// an error, nor is deleting an endpoint whose interface is gone.
func TestClsactInterfaceRecreated(t *testing.T) {
	bpftest.RequireRoot(t)
	tp := newTopo(t)
	serve(t, tp.b)
	pinDir := nodePinDir(t, tp)
	o := loadIn(t, tp, pinDir, AttachClsact)
	t.Cleanup(func() { o.Close() })
	bPol := EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB)}, IngressEnforced: true, DefaultDenyPolicy: 20,
		Ingress: []PeerEntry{peer(ipA+"/32", rule(TCP, 80, 0, 21, 0))}}
	applyIn(t, tp, o, bPol)
	if probeTCP(t, tp.a, hostPort(ipB, 81), denyWait) {
		t.Fatal("a->b tcp 81 not denied")
	}

	recreate := func() int {
		sh(t, "ip", "-n", tp.n, "link", "del", "vb")
		for _, c := range [][]string{
			{"ip", "-n", tp.n, "link", "add", "vb", "type", "veth", "peer", "name", "eth0", "netns", tp.b},
			{"ip", "-n", tp.n, "addr", "add", ipNB + "/28", "dev", "vb"},
			{"ip", "-n", tp.b, "addr", "add", ipB + "/28", "dev", "eth0"},
			{"ip", "-n", tp.n, "link", "set", "vb", "up"},
			{"ip", "-n", tp.b, "link", "set", "eth0", "up"},
			{"ip", "-n", tp.b, "route", "add", "default", "via", ipNB},
		} {
			sh(t, c...)
		}
		return ifindexIn(t, tp.n, "vb")
	}
	old := tp.ifB
	tp.ifB = recreate()
	if tp.ifB == old {
		t.Fatalf("recreated vb kept ifindex %d", old)
	}
	if probeTCP(t, tp.a, hostPort(ipB, 81), allowWait) == false {
		t.Fatal("recreated topology broken")
	}
	bPol.IfIndex = tp.ifB
	applyIn(t, tp, o, bPol) // detaches the vanished old ifindex: no error
	from, to := o.Programs()
	wantOurs(t, tp.n, tp.ifB, from, to)
	if probeTCP(t, tp.a, hostPort(ipB, 81), denyWait) {
		t.Error("a->b tcp 81 not denied on the new interface")
	}
	if !probeTCP(t, tp.a, hostPort(ipB, 80), allowWait) {
		t.Error("a->b tcp 80 fails on the new interface")
	}

	sh(t, "ip", "-n", tp.n, "link", "del", "vb")
	if err := inNetns(tp.n, func() error { return o.DeleteEndpoint(2) }); err != nil {
		t.Errorf("delete endpoint of a vanished interface: %v", err)
	}
	if err := inNetns(tp.n, o.Detach); err != nil {
		t.Errorf("detach with a vanished interface: %v", err)
	}
}

// Restarting with the other mode moves the attachments over: the new
// mode's are in place before the old mode's go.
func TestAttachModeSwitch(t *testing.T) {
	bpftest.RequireRoot(t)
	tp := newTopo(t)
	serve(t, tp.b)
	pinDir := nodePinDir(t, tp)
	bPol := EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB)}, IngressEnforced: true, DefaultDenyPolicy: 20,
		Ingress: []PeerEntry{peer(ipA+"/32", rule(TCP, 80, 0, 21, 0))}}
	aPol := EndpointPolicy{ID: 1, IfIndex: tp.ifA, IPs: []netip.Addr{addr(ipA)}}
	for i, mode := range []AttachMode{AttachTCX, AttachClsact, AttachTCX} {
		o := loadIn(t, tp, pinDir, mode)
		if i == 0 {
			applyIn(t, tp, o, bPol)
			applyIn(t, tp, o, aPol)
		}
		attached(t, tp, mode, 4)
		if probeTCP(t, tp.a, hostPort(ipB, 81), denyWait) {
			t.Errorf("%s: a->b tcp 81 not denied", mode)
		}
		if !probeTCP(t, tp.a, hostPort(ipB, 80), allowWait) {
			t.Errorf("%s: a->b tcp 80 fails", mode)
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := inNetns(tp.n, func() error { return DetachPinned(pinDir) }); err != nil {
		t.Fatal(err)
	}
	attached(t, tp, AttachTCX, 0)
	attached(t, tp, AttachClsact, 0)
}
