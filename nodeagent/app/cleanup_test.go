//go:build linux

package app

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// cmdTestNode is an agent's leftovers on one node: a pinned map and a
// kebpf_ program using it, attached at the node's cgroup root (its own
// cgroup2 mount of its cgroup) by a pinned link, all in its own bpffs.
type cmdTestNode struct {
	pinDir, cgroup, cgroupRoot string
	linkID                     link.ID
}

func newCmdTestNode(t *testing.T) *cmdTestNode {
	t.Helper()
	n := &cmdTestNode{pinDir: bpftest.PinDir(t), cgroup: bpftest.Cgroup(t)}
	n.cgroupRoot = filepath.Join(t.TempDir(), "cgroupv2")
	if err := os.Mkdir(n.cgroupRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(n.cgroup, n.cgroupRoot, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s at %s: %v", n.cgroup, n.cgroupRoot, err)
	}
	t.Cleanup(func() { unix.Unmount(n.cgroupRoot, unix.MNT_DETACH) })
	if err := os.MkdirAll(n.pinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "kebpf_cmdtest", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(n.pinDir, "kebpf_cmdtest")); err != nil {
		t.Fatal(err)
	}
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "kebpf_cmdtest", Type: ebpf.CGroupSock, AttachType: ebpf.AttachCGroupInetSockCreate, License: "GPL",
		Instructions: asm.Instructions{
			// Reference the map (the load is discarded) so the program uses it.
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: n.cgroupRoot, Attach: ebpf.AttachCGroupInetSockCreate, Program: p})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	n.linkID = info.ID
	t.Cleanup(func() {
		if l, err := link.NewFromID(n.linkID); err == nil {
			l.Unpin()
			l.Detach()
			l.Close()
		}
	})
	if err := l.Pin(filepath.Join(n.pinDir, "link")); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *cmdTestNode) attached(t *testing.T) []bpftest.CgroupProg {
	t.Helper()
	return bpftest.CgroupProgs(t, n.cgroup)
}

// TestCleanupCommandLeavesOtherNode runs `kebpf-agent cleanup` for one of
// two nodes sharing this kernel (in a network namespace of its own, as a
// node's cleanup pod is): it exits 0, and the other node's link stays
// attached with its pins in place.
func TestCleanupCommandLeavesOtherNode(t *testing.T) {
	bpftest.RequireRoot(t)
	a, b := newCmdTestNode(t), newCmdTestNode(t)
	var stdout, stderr bytes.Buffer
	cmd := NewRootCommand(&stdout, &stderr)
	cmd.SetArgs([]string{"cleanup", "--pin-dir", a.pinDir, "--cgroup-root", a.cgroupRoot, "--state-dir", ""})
	err := netnsutil.Do(netnsutil.Path(bpftest.Netns(t, "kebpf-cl-")), cmd.Execute)
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	if err != nil {
		t.Fatalf("cleanup node a: %v", err)
	}
	if got := a.attached(t); len(got) > 0 {
		t.Errorf("node a: still attached: %+v", got)
	}
	if got := b.attached(t); len(got) != 1 || got[0].Name != "kebpf_cmdtest" {
		t.Errorf("node b: want its kebpf_cmdtest still attached, have %+v", got)
	}
	for _, pin := range []string{"kebpf_cmdtest", "link"} {
		if _, err := os.Stat(filepath.Join(b.pinDir, pin)); err != nil {
			t.Errorf("node b: pin %s: %v", pin, err)
		}
	}
	if strings.Contains(stdout.String(), b.pinDir) {
		t.Errorf("node a's cleanup mentions node b's pin dir")
	}
}
