//go:build linux

package cleanup

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockstats"
)

// privateCgroup2 mounts cgroup2 where the agent would mount its own.
func privateCgroup2(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "cgroupv2")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("cgroup2", dir, "cgroup2", 0, ""); err != nil {
		t.Fatalf("mount cgroup2 at %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// owned restricts cleanup to objects this test created, so parallel test
// packages (or anything else on this kernel) keep their kebpf_ objects.
type owned map[string]map[uint32]bool

func (o owned) add(kind string, id uint32) {
	if o[kind] == nil {
		o[kind] = map[uint32]bool{}
	}
	o[kind][id] = true
}

func (o owned) owns(obj Object) bool {
	return OwnsByPrefix(obj) && o[obj.Kind][obj.ID]
}

func (o owned) addProgram(t *testing.T, p *ebpf.Program) {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	o.add("program", uint32(id))
}

func (o owned) addLink(t *testing.T, l link.Link) {
	t.Helper()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	o.add("link", uint32(info.ID))
}

func (o owned) addPinnedMap(t *testing.T, path string) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	o.add("map", uint32(id))
}

func allowProgram(t *testing.T, name string) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         name,
		Type:         ebpf.CGroupSock,
		AttachType:   ebpf.AttachCGroupInetSockCreate,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func attachedNames(t *testing.T, cgroup string) string {
	t.Helper()
	out, err := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show %s: %v\n%s", cgroup, err, out)
	}
	return string(out)
}

func TestRunRemovesEverything(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	cgroup := bpftest.Cgroup(t)
	cgroupRoot := privateCgroup2(t)
	ours := owned{}

	// What a stopped agent leaves behind: a pinned link and map.
	objs, err := sockstats.Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sockstats.DetachPinned(pinDir) })
	if err := objs.Attach(cgroup); err != nil {
		objs.Close()
		t.Fatal(err)
	}
	ours.addProgram(t, objs.Program())
	if l, err := link.LoadPinnedLink(sockstats.LinkPinPath(pinDir), nil); err == nil {
		ours.addLink(t, l)
		l.Close()
	} else {
		t.Fatal(err)
	}
	ours.addPinnedMap(t, sockstats.MapPinPath(pinDir))
	objs.Close()

	// A pinned program nobody attached and an unpinned link still held
	// open by a process (here: this test), as a crashed helper might leave.
	stray := allowProgram(t, "kebpf_cltest")
	t.Cleanup(func() { stray.Close() })
	ours.addProgram(t, stray)
	if err := os.MkdirAll(filepath.Join(pinDir, "progs"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := stray.Pin(filepath.Join(pinDir, "progs", "kebpf_cltest")); err != nil {
		t.Fatal(err)
	}
	held, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: ebpf.AttachCGroupInetSockCreate, Program: stray})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { held.Close() })
	ours.addLink(t, held)
	// The test's own fd would keep the program alive; cleanup must still
	// detach it, and verification must see the program go once we let go.
	stray.Close()

	if got := attachedNames(t, cgroup); strings.Count(got, "kebpf_") != 2 {
		t.Fatalf("setup: want 2 kebpf_ programs at %s, bpftool shows:\n%s", cgroup, got)
	}

	var out bytes.Buffer
	opts := Options{PinDir: pinDir, CgroupRoot: cgroupRoot, Out: &out, Owns: ours.owns}
	// The held link object outlives its detach while this test holds the fd,
	// so Run is expected to report it; it must be gone once we close it.
	opts.Settle = 200 * time.Millisecond
	// Run takes the same snapshot; the test needs it to re-check after
	// letting go of the held link, when the pins are gone.
	sc, err := Snapshot(opts)
	if err != nil {
		t.Fatal(err)
	}
	runErr := Run(opts)
	held.Close()
	t.Logf("cleanup output:\n%s", out.String())
	if runErr != nil {
		// Only the still-open held link may be reported; recheck after close.
		rem, err := waitRemaining(opts, sc)
		if err != nil || len(rem) > 0 {
			t.Fatalf("Run: %v; remaining after closing held link: %q (%v)", runErr, rem, err)
		}
	}

	for _, want := range []string{
		"detached pinned link " + sockstats.LinkPinPath(pinDir),
		"removed pin " + sockstats.MapPinPath(pinDir),
		"removed pin " + filepath.Join(pinDir, "progs", "kebpf_cltest"),
		"removed dir " + pinDir,
		"detached link",
		"unmounted cgroup2 " + cgroupRoot,
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if got := attachedNames(t, cgroup); strings.Contains(got, "kebpf_") {
		t.Errorf("still attached at %s:\n%s", cgroup, got)
	}
	if _, err := os.Lstat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir %s still exists (%v)", pinDir, err)
	}
	if mps, _ := mountsAt(cgroupRoot); mps != 0 {
		t.Errorf("%d mounts still at %s", mps, cgroupRoot)
	}
}

func waitRemaining(opts Options, sc *Scope) ([]string, error) {
	deadline := time.Now().Add(2 * time.Second)
	for {
		rem, err := Remaining(opts, sc)
		if err != nil || len(rem) == 0 || time.Now().After(deadline) {
			return rem, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func mountsAt(path string) (int, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			n++
		}
	}
	return n, nil
}

func TestRunNothingToDo(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	var out bytes.Buffer
	opts := Options{PinDir: pinDir, CgroupRoot: filepath.Join(t.TempDir(), "cgroupv2"), Out: &out, Owns: owned{}.owns}
	for i := range 2 {
		if err := Run(opts); err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
	}
	if out.Len() != 0 {
		t.Errorf("nothing to remove, but printed:\n%s", out.String())
	}
}

// TestRunFailsWhileSomethingRemains: a program of ours (pinned in our pin
// dir, so in this node's scope) held open by a process cannot be removed by
// cleanup, so Run must fail and name it.
func TestRunFailsWhileSomethingRemains(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	p := allowProgram(t, "kebpf_clheld")
	t.Cleanup(func() { p.Close() })
	ours := owned{}
	ours.addProgram(t, p)
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := p.Pin(filepath.Join(pinDir, "kebpf_clheld")); err != nil {
		t.Fatal(err)
	}

	err := Run(Options{PinDir: pinDir, Owns: ours.owns, Settle: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "kebpf_clheld") {
		t.Fatalf("Run = %v, want an error naming kebpf_clheld", err)
	}
}

func TestDefaultOwnsByPrefix(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"kebpf_sockstat", true},
		{"kebpf_", true},
		{"cilium_sock", false},
		{"", false},
		{"xkebpf_", false},
	}
	for _, tt := range tests {
		if got := OwnsByPrefix(Object{Kind: "program", Name: tt.name}); got != tt.want {
			t.Errorf("owns(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}
