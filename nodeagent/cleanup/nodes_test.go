//go:build linux

package cleanup

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// testNode is one "node" of a local cluster on this kernel: its own bpffs
// (pinDir), its own cgroup (cgroup) seen through its own cgroup2 mount
// (cgroupRoot, a bind mount of cgroup, as a node's cgroup namespace shows
// its subtree as root), and objects with the same kebpf_ names on every
// node.
type testNode struct {
	name       string
	pinDir     string
	cgroup     string // the cgroup on the host hierarchy (for moving the test into it)
	cgroupRoot string // the node's cgroup2 mount, the agent's --cgroup-root
	mapPin     string
	ids        owned // every kernel object of the node, for the checks
	held       link.Link
	heldClosed chan struct{}
}

// counterProgram is a cgroup/connect4 program that counts connects in
// slot 0 of counts and allows them.
func counterProgram(t *testing.T, name string, attach ebpf.AttachType, counts *ebpf.Map) *ebpf.Program {
	t.Helper()
	typ := ebpf.CGroupSockAddr
	if attach == ebpf.AttachCGroupInetSockCreate {
		typ = ebpf.CGroupSock
	}
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:       name,
		Type:       typ,
		AttachType: attach,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, counts.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load %s: %v", name, err)
	}
	return p
}

func progID(t *testing.T, p *ebpf.Program) uint32 {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return uint32(id)
}

// newTestNode builds what a running agent leaves on a node:
//   - a map pinned in the node's bpffs;
//   - a connect4 program using it, attached at the node's cgroup root by a
//     pinned cgroup link (the datapath);
//   - a program using the map attached by an unpinned link at a pod cgroup
//     below the root, the link held open by this test (a crashed agent's
//     child holding a tcx link on a pod veth: found only by the map rule);
//   - a program without maps attached at the cgroup root with legacy
//     BPF_PROG_ATTACH and no pin (found only by the cgroup root query).
func newTestNode(t *testing.T, name string) *testNode {
	t.Helper()
	n := &testNode{name: name, ids: owned{}, heldClosed: make(chan struct{})}
	n.pinDir = bpftest.PinDir(t) // a bpffs instance of its own
	n.cgroup = bpftest.Cgroup(t)
	pod := bpftest.SubCgroup(t, n.cgroup, "pod")
	n.cgroupRoot = filepath.Join(t.TempDir(), "cgroupv2")
	if err := os.Mkdir(n.cgroupRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(n.cgroup, n.cgroupRoot, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s at %s: %v", n.cgroup, n.cgroupRoot, err)
	}
	t.Cleanup(func() { unix.Unmount(n.cgroupRoot, unix.MNT_DETACH) })

	for _, d := range []string{"maps", "links"} {
		if err := os.MkdirAll(filepath.Join(n.pinDir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	counts, err := ebpf.NewMap(&ebpf.MapSpec{Name: "kebpf_clcount", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer counts.Close()
	n.mapPin = filepath.Join(n.pinDir, "maps", "kebpf_clcount")
	if err := counts.Pin(n.mapPin); err != nil {
		t.Fatal(err)
	}
	minfo, err := counts.Info()
	if err != nil {
		t.Fatal(err)
	}
	mid, _ := minfo.ID()
	n.ids.add("map", uint32(mid))

	conn := counterProgram(t, "kebpf_clconn4", ebpf.AttachCGroupInet4Connect, counts)
	defer conn.Close()
	n.ids.add("program", progID(t, conn))
	l, err := link.AttachCgroup(link.CgroupOptions{Path: n.cgroupRoot, Attach: ebpf.AttachCGroupInet4Connect, Program: conn})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detachByID(n.ids) })
	n.ids.addLink(t, l)
	if err := l.Pin(filepath.Join(n.pinDir, "links", "kebpf_clconn4")); err != nil {
		l.Close()
		t.Fatal(err)
	}
	l.Close()

	heldProg := counterProgram(t, "kebpf_clheld", ebpf.AttachCGroupInetSockCreate, counts)
	defer heldProg.Close()
	n.ids.add("program", progID(t, heldProg))
	n.held, err = link.AttachCgroup(link.CgroupOptions{Path: pod, Attach: ebpf.AttachCGroupInetSockCreate, Program: heldProg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.releaseHeld)
	n.ids.addLink(t, n.held)

	legacy := allowProgram(t, "kebpf_cllegacy")
	defer legacy.Close()
	n.ids.add("program", progID(t, legacy))
	cg, err := os.Open(n.cgroupRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: int(cg.Fd()), Program: legacy, Attach: ebpf.AttachCGroupInetSockCreate, Flags: unix.BPF_F_ALLOW_MULTI,
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { detachLegacyFrom(n.cgroup, ebpf.AttachCGroupInetSockCreate, n.ids) })
	return n
}

func (n *testNode) releaseHeld() {
	select {
	case <-n.heldClosed:
	default:
		close(n.heldClosed)
		n.held.Close()
	}
}

// releaseHeldOnDetach plays the crashed agent's child: it lets go of its
// link fd once cleanup has detached the link (a detached link attaches
// nothing, but its fd keeps the link and its program in the kernel, which
// Run would rightly report as still present).
func (n *testNode) releaseHeldOnDetach(t *testing.T) {
	go func() {
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			info, err := n.held.Info()
			if err == nil {
				if cg := info.Cgroup(); cg != nil && cg.CgroupId == 0 {
					break
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
		n.releaseHeld()
	}()
}

// detachByID detaches, as a safety net for a failing test, every link of
// ids that is still in the kernel.
func detachByID(ids owned) {
	for id := range ids["link"] {
		l, err := link.NewFromID(link.ID(id))
		if err != nil {
			continue
		}
		l.Unpin()
		l.Detach()
		l.Close()
	}
}

// detachLegacyFrom detaches the programs of ids attached at cgroup with
// BPF_PROG_ATTACH (safety net for a failing test).
func detachLegacyFrom(cgroup string, at ebpf.AttachType, ids owned) {
	cg, err := os.Open(cgroup)
	if err != nil {
		return
	}
	defer cg.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
	if err != nil {
		return
	}
	for _, ap := range res.Programs {
		if _, isLink := ap.LinkID(); isLink || !ids["program"][uint32(ap.ID)] {
			continue
		}
		if p, err := ebpf.NewProgramFromID(ap.ID); err == nil {
			link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(cg.Fd()), Program: p, Attach: at})
			p.Close()
		}
	}
}

// present lists which of n's kernel objects still exist.
func (n *testNode) present() []string {
	var out []string
	for id := range n.ids["map"] {
		if m, err := ebpf.NewMapFromID(ebpf.MapID(id)); err == nil {
			m.Close()
			out = append(out, fmt.Sprintf("map %d", id))
		}
	}
	for id := range n.ids["program"] {
		if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id)); err == nil {
			p.Close()
			out = append(out, fmt.Sprintf("program %d", id))
		}
	}
	for id := range n.ids["link"] {
		if l, err := link.NewFromID(link.ID(id)); err == nil {
			l.Close()
			out = append(out, fmt.Sprintf("link %d", id))
		}
	}
	return out
}

// attached lists the programs attached at the node's cgroup and pod cgroup.
func (n *testNode) attached(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, cg := range []string{n.cgroup, filepath.Join(n.cgroup, "pod")} {
		for _, p := range bpftest.CgroupProgs(t, cg) {
			out = append(out, fmt.Sprintf("%s %s", p.AttachType, p.Name))
		}
	}
	return out
}

// connects is the node's connect4 counter, read through its pin.
func (n *testNode) connects(t *testing.T) uint64 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(n.mapPin, nil)
	if err != nil {
		t.Fatalf("node %s: load pinned counter: %v", n.name, err)
	}
	defer m.Close()
	var v uint64
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// connectFrom connects to addr from inside cgroup (a pod process on the
// node).
func connectFrom(t *testing.T, cgroup, addr string) {
	t.Helper()
	bpftest.InCgroup(t, cgroup, func() {
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			t.Errorf("connect to %s from %s: %v", addr, cgroup, err)
			return
		}
		c.Close()
	})
}

// TestRunLeavesOtherNodes: two nodes on one kernel, like the nodes of a
// kind cluster. Cleaning node A removes everything of A and nothing of B,
// with the default ownership (kebpf_ prefix, no test narrowing): B's links
// stay attached, its programs loaded, its maps pinned, its connect4
// datapath keeps counting, and Run does not report B's objects (nor a
// bystander kebpf_ program of neither node) as still present.
func TestRunLeavesOtherNodes(t *testing.T) {
	bpftest.RequireRoot(t)
	a := newTestNode(t, "a")
	b := newTestNode(t, "b")
	// A kebpf_ program reachable from neither node (another agent, a test
	// of another package): neither cleanup may touch or report it.
	other := allowProgram(t, "kebpf_clother")
	t.Cleanup(func() { other.Close() })
	otherID := progID(t, other)

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := ln.Addr().String()

	for _, n := range []*testNode{a, b} {
		if got := n.attached(t); len(got) != 3 {
			t.Fatalf("setup: node %s: want 3 attachments, have %q", n.name, got)
		}
		before := n.connects(t)
		connectFrom(t, n.cgroup, addr)
		if after := n.connects(t); after <= before {
			t.Fatalf("setup: node %s: connect4 counter %d -> %d: datapath not counting", n.name, before, after)
		}
	}
	bAttached := b.attached(t)

	cleanNode := func(n *testNode) string {
		t.Helper()
		var out bytes.Buffer
		n.releaseHeldOnDetach(t)
		err := Run(Options{PinDir: n.pinDir, CgroupRoot: n.cgroupRoot, Out: &out})
		t.Logf("node %s cleanup output:\n%s", n.name, out.String())
		if err != nil {
			t.Fatalf("node %s: Run: %v", n.name, err)
		}
		return out.String()
	}

	out := cleanNode(a)
	for _, want := range []string{
		"detached pinned link " + filepath.Join(a.pinDir, "links", "kebpf_clconn4"),
		"removed pin " + a.mapPin,
		"detached link", // the held one
		"detached program",
		"unmounted cgroup2 " + a.cgroupRoot,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("node a output lacks %q", want)
		}
	}
	for _, id := range []string{fmt.Sprint(otherID), b.pinDir} {
		if strings.Contains(out, id) {
			t.Errorf("node a cleanup mentions %s (not node a's)", id)
		}
	}
	if got := a.present(); len(got) > 0 {
		t.Errorf("node a: still in the kernel after its cleanup: %v", got)
	}
	if got := a.attached(t); len(got) > 0 {
		t.Errorf("node a: still attached after its cleanup: %q", got)
	}
	if _, err := os.Lstat(a.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("node a: pin dir %s still exists (%v)", a.pinDir, err)
	}

	// Node B untouched, and working.
	if got := b.present(); len(got) != 1+3+2 {
		t.Errorf("node b: want its 1 map, 3 programs (connect4, held, legacy), 2 links (pinned, held), have %v", got)
	}
	if got := b.attached(t); strings.Join(got, ",") != strings.Join(bAttached, ",") {
		t.Errorf("node b: attachments changed by node a's cleanup: %q -> %q", bAttached, got)
	}
	if _, err := os.Stat(b.mapPin); err != nil {
		t.Errorf("node b: map pin gone: %v", err)
	}
	before := b.connects(t)
	connectFrom(t, b.cgroup, addr)
	if after := b.connects(t); after <= before {
		t.Errorf("node b: connect4 counter %d -> %d after node a's cleanup: b's datapath is gone", before, after)
	}
	if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(otherID)); err != nil {
		t.Errorf("bystander program %d gone: %v", otherID, err)
	} else {
		p.Close()
	}

	cleanNode(b)
	if got := b.present(); len(got) > 0 {
		t.Errorf("node b: still in the kernel after its cleanup: %v", got)
	}
	if got := b.attached(t); len(got) > 0 {
		t.Errorf("node b: still attached after its cleanup: %q", got)
	}
	if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(otherID)); err != nil {
		t.Errorf("bystander program %d gone after node b's cleanup: %v", otherID, err)
	} else {
		p.Close()
	}
}
