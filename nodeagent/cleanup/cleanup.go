//go:build linux

// Package cleanup removes everything the agent ever put into the kernel or
// onto the node: pinned links (which detaches them), pinned maps, the pin
// dir, attachments still held by a process, and our cgroup2 mount.
//
// "Everything" means everything of THIS node. The nodes of a local test
// cluster (kind) are containers sharing one kernel: every node's agent
// creates kebpf_-named programs, maps and links in the same global ID
// spaces, each with its own bpffs (PinDir, in the node's mount namespace)
// and its own cgroup namespace (CgroupRoot shows the node's subtree as the
// root). A name-prefix scan of the whole kernel would uninstall one node and
// tear down the datapath of all the others, and its verification would
// report the other nodes' live objects as left behind. So cleanup works on
// a Scope: what is reachable from this node's PinDir and CgroupRoot, taken
// before anything is removed (see Snapshot).
package cleanup

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
)

// NamePrefix marks every program and map we create (on every node: the
// prefix says "kubectl-ebpf", never "this node").
const NamePrefix = "kebpf_"

// Object is a kernel object found while scanning.
type Object struct {
	Kind string // "program", "map" or "link"
	ID   uint32
	Name string // program name for links
}

func (o Object) String() string { return fmt.Sprintf("%s %d (%s)", o.Kind, o.ID, o.Name) }

// OwnsByPrefix is the default Owns: the kebpf_ name prefix. It is applied
// on top of the node Scope, never instead of it.
func OwnsByPrefix(o Object) bool { return strings.HasPrefix(o.Name, NamePrefix) }

// Options says what to clean.
type Options struct {
	// PinDir is removed with everything under it.
	PinDir string
	// CgroupRoot is unmounted when a cgroup2 is mounted exactly there
	// (the path is ours by contract); empty skips the unmount.
	CgroupRoot string
	// Out receives one line per removed thing.
	Out io.Writer
	// Owns further narrows which in-scope kernel objects are ours: an
	// object is touched (and reported as remaining) only when it is in this
	// node's Scope AND Owns accepts it. Nil means "name starts with kebpf_";
	// tests narrow it further so they never touch objects of other
	// processes on a shared kernel.
	Owns func(Object) bool
	// Settle bounds how long verification waits for the kernel to free
	// detached programs and maps (freeing is deferred past an RCU grace
	// period). Zero means 2s.
	Settle time.Duration
}

// Run removes everything of this node's and then verifies nothing of it
// remains. The returned error lists whatever is left (or could not be
// scanned). Objects of other nodes on the same kernel are neither touched
// nor reported: the Scope is taken first, while the pins that say what is
// ours still exist.
func Run(opts Options) error {
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	if opts.Owns == nil {
		opts.Owns = OwnsByPrefix
	}
	if opts.Settle == 0 {
		opts.Settle = 2 * time.Second
	}
	var errs []error
	sc, err := Snapshot(opts)
	if err != nil {
		// A partial scope removes less, never more; say what was missed.
		errs = append(errs, fmt.Errorf("scope: %w", err))
	}
	if err := removePins(opts); err != nil {
		errs = append(errs, err)
	}
	if err := detachLinks(opts, sc); err != nil {
		errs = append(errs, err)
	}
	if err := detachLegacy(opts); err != nil {
		errs = append(errs, err)
	}
	if err := unmountCgroup(opts); err != nil {
		errs = append(errs, err)
	}

	remaining, err := waitGone(opts, sc)
	if err != nil {
		errs = append(errs, err)
	}
	if len(remaining) > 0 {
		errs = append(errs, fmt.Errorf("still present: %s", strings.Join(remaining, "; ")))
	}
	return errors.Join(errs...)
}

// removePins detaches pinned links first, so the datapath goes away in one
// step per hook, then unlinks every other pin and the directories.
func removePins(opts Options) error {
	if _, err := os.Lstat(opts.PinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var files, dirs []string
	err := filepath.WalkDir(opts.PinDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, path)
		} else {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("walk %s: %w", opts.PinDir, err)
	}
	var errs []error
	for _, f := range files {
		if l, err := link.LoadPinnedLink(f, nil); err == nil {
			desc := describeLink(l)
			if err := detach(l); err != nil {
				errs = append(errs, fmt.Errorf("detach pinned link %s: %w", f, err))
				continue
			}
			fmt.Fprintf(opts.Out, "detached pinned link %s: %s\n", f, desc)
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove pin %s: %w", f, err))
			continue
		}
		fmt.Fprintf(opts.Out, "removed pin %s\n", f)
	}
	// Deepest first, so each directory is empty when removed.
	slices.Reverse(dirs)
	for _, d := range dirs {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove dir %s: %w", d, err))
			continue
		}
		fmt.Fprintf(opts.Out, "removed dir %s\n", d)
	}
	return errors.Join(errs...)
}

// detach unpins (if pinned), force-detaches and closes l. The explicit
// detach matters: an fd held by another process (a crashed agent's child, a
// debugging bpftool) would otherwise keep the program attached.
func detach(l link.Link) error {
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin: %w", err)
	}
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		return fmt.Errorf("detach: %w", err)
	}
	return nil
}

func describeLink(l link.Link) string {
	info, err := l.Info()
	if err != nil {
		return "link (no info)"
	}
	s := fmt.Sprintf("link %d program %d %s", info.ID, info.Program, progName(info.Program))
	if cg := info.Cgroup(); cg != nil {
		s += fmt.Sprintf(" cgroup %d", cg.CgroupId)
	}
	return s
}

func progName(id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return "?"
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return "?"
	}
	return info.Name
}

// ourLinks lists the links of sc that opts.Owns accepts.
func ourLinks(opts Options, sc *Scope) ([]link.Link, error) {
	var out []link.Link
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue // the link went away while we looked
		}
		if !sc.hasLink(info) {
			continue
		}
		if !opts.Owns(Object{Kind: "link", ID: uint32(info.ID), Name: progName(info.Program)}) {
			continue
		}
		out = append(out, it.Take())
	}
	if err := it.Err(); err != nil {
		for _, l := range out {
			l.Close()
		}
		return nil, fmt.Errorf("iterate links: %w", err)
	}
	return out, nil
}

// detachLinks handles links of this node that are no longer (or never
// were) pinned but are still held open by some process. It walks the
// kernel's whole link list (there is no per-namespace one) and keeps only
// the links in sc: another node's links on the same kernel stay attached.
func detachLinks(opts Options, sc *Scope) error {
	links, err := ourLinks(opts, sc)
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		desc := describeLink(l)
		if err := l.Detach(); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", desc, err))
		} else {
			fmt.Fprintf(opts.Out, "detached %s\n", desc)
		}
		l.Close()
	}
	return errors.Join(errs...)
}

// cgroupAttachTypes are the hooks our datapath uses at the cgroup root.
var cgroupAttachTypes = []ebpf.AttachType{
	ebpf.AttachCGroupInetSockCreate,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
	ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
	ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
	ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	ebpf.AttachCGroupSetsockopt, ebpf.AttachCGroupInet4Bind, ebpf.AttachCGroupInet6Bind,
	ebpf.AttachCGroupGetsockopt, ebpf.AttachCGroupSockOps,
}

// detachLegacy removes programs attached at the cgroup root with
// BPF_PROG_ATTACH (the fallback on kernels without cgroup links), which the
// link scan cannot see. It is per node already: it queries only this node's
// CgroupRoot (in the node's cgroup namespace, the node's own subtree), so
// other nodes' attachments, at their own cgroups, are never listed.
func detachLegacy(opts Options) error {
	if opts.CgroupRoot == "" {
		return nil
	}
	if ok, _ := mounts.IsCgroup2(opts.CgroupRoot); !ok {
		return nil
	}
	cg, err := os.Open(opts.CgroupRoot)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", opts.CgroupRoot, err)
	}
	defer cg.Close()
	var errs []error
	for _, at := range cgroupAttachTypes {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			continue // attach type unknown to this kernel
		}
		for _, ap := range res.Programs {
			if _, isLink := ap.LinkID(); isLink {
				continue // handled by the link scan
			}
			name := progName(ap.ID)
			if !opts.Owns(Object{Kind: "program", ID: uint32(ap.ID), Name: name}) {
				continue
			}
			p, err := ebpf.NewProgramFromID(ap.ID)
			if err != nil {
				continue
			}
			err = link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(cg.Fd()), Program: p, Attach: at})
			p.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("detach program %d %s from %s: %w", ap.ID, name, opts.CgroupRoot, err))
				continue
			}
			fmt.Fprintf(opts.Out, "detached program %d %s (%s) from %s\n", ap.ID, name, at, opts.CgroupRoot)
		}
	}
	return errors.Join(errs...)
}

func unmountCgroup(opts Options) error {
	if opts.CgroupRoot == "" {
		return nil
	}
	n, err := mounts.Unmount(opts.CgroupRoot, "cgroup2")
	if err != nil {
		return err
	}
	if n > 0 {
		fmt.Fprintf(opts.Out, "unmounted cgroup2 %s\n", opts.CgroupRoot)
		// Only remove the directory we mounted on; leave it if it is busy.
		os.Remove(opts.CgroupRoot)
	}
	return nil
}

// waitGone scans until nothing of ours is left or Settle passes.
func waitGone(opts Options, sc *Scope) ([]string, error) {
	deadline := time.Now().Add(opts.Settle)
	for {
		remaining, err := Remaining(opts, sc)
		if err != nil || len(remaining) == 0 || time.Now().After(deadline) {
			return remaining, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Remaining lists what of this node still exists: the pin dir, our cgroup2
// mount, and the links, programs and maps in sc (taken by Snapshot before
// anything was removed) that opts.Owns accepts. A program is also in scope
// when its name has our prefix and it uses a map that was pinned in our pin
// dir: a process still holding such a program keeps it alive after the
// pins are gone. Objects of other nodes sharing this kernel are never
// listed, however they are named.
func Remaining(opts Options, sc *Scope) ([]string, error) {
	if opts.Owns == nil {
		opts.Owns = OwnsByPrefix
	}
	if sc == nil {
		sc = newScope()
	}
	var out []string
	if _, err := os.Lstat(opts.PinDir); err == nil {
		out = append(out, "pin dir "+opts.PinDir)
	}
	if opts.CgroupRoot != "" {
		mps, err := mounts.MountPoints(opts.CgroupRoot)
		if err != nil {
			return out, err
		}
		for _, mp := range mps {
			if mp.FSType == "cgroup2" {
				out = append(out, "cgroup2 mount "+opts.CgroupRoot)
			}
		}
	}
	// Programs first: a link is ours when its program is.
	var progs []string
	sc.scanPrograms(func(id ebpf.ProgramID, name string) {
		if o := (Object{Kind: "program", ID: uint32(id), Name: name}); opts.Owns(o) {
			progs = append(progs, o.String())
		}
	})
	links, err := ourLinks(opts, sc)
	if err != nil {
		return out, err
	}
	for _, l := range links {
		out = append(out, describeLink(l))
		l.Close()
	}
	out = append(out, progs...)
	for id, err := ebpf.MapGetNextID(0); err == nil; id, err = ebpf.MapGetNextID(id) {
		if !sc.maps[id] {
			continue
		}
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		info, err := m.Info()
		m.Close()
		if err != nil {
			continue
		}
		if o := (Object{Kind: "map", ID: uint32(id), Name: info.Name}); opts.Owns(o) {
			out = append(out, o.String())
		}
	}
	return out, nil
}
