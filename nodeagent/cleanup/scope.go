//go:build linux

package cleanup

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
)

// Scope is the set of kernel objects that belong to this node.
//
// Why a scope: the nodes of a local cluster (kind) share one kernel, and
// the kernel's program, map and link IDs, their names and the link list are
// global. Every node's agent names its objects kebpf_*, so the prefix cannot
// tell one node's objects from another's. What is per node is the node's
// bpffs (PinDir, in its own mount namespace) and its cgroup namespace
// (CgroupRoot shows the node's cgroup as the root). Ownership is therefore
// reachability from those two:
//
//   - maps and programs pinned under PinDir, links pinned there and their
//     programs;
//   - kebpf_-named programs that use a map pinned under PinDir (this catches
//     tcx programs on pod veths and anything a crashed agent's child still
//     holds: they all use the pinned policy/LB maps);
//   - links whose program is ours;
//   - links at CgroupRoot, and programs attached there (by link or by legacy
//     BPF_PROG_ATTACH), when the program is kebpf_-named; the cgroup is
//     compared by id (the inode number of the cgroup2 directory is the
//     cgroup id the kernel reports in link info);
//   - for reporting only: the maps used by the programs above.
//
// The pins are what say which objects are ours, and removing them is the
// first step of cleanup, so a Scope is a snapshot taken before anything is
// removed. Kernel IDs are allocated cyclically and not reused until they
// wrap, so the snapshot's IDs keep naming the same objects for the length
// of a cleanup.
//
// Limits: an object that was never reachable from this node's pins or
// cgroup (say, a kebpf_ map held alone by a stray process after an earlier,
// partial cleanup removed its pin) cannot be told apart from another node's,
// and is left alone.
type Scope struct {
	// pinnedMaps are the maps pinned under PinDir: the map-intersection
	// rule uses only these, so it never grows transitively.
	pinnedMaps map[ebpf.MapID]bool
	// maps are reported while they exist: pinnedMaps plus the maps of our
	// programs at snapshot time.
	maps     map[ebpf.MapID]bool
	progs    map[ebpf.ProgramID]bool
	links    map[link.ID]bool
	cgroupID uint64 // of CgroupRoot; 0 when there is none
}

func newScope() *Scope {
	return &Scope{
		pinnedMaps: map[ebpf.MapID]bool{},
		maps:       map[ebpf.MapID]bool{},
		progs:      map[ebpf.ProgramID]bool{},
		links:      map[link.ID]bool{},
	}
}

func (sc *Scope) String() string {
	return fmt.Sprintf("%d maps (%d pinned), %d programs, %d links, cgroup id %d",
		len(sc.maps), len(sc.pinnedMaps), len(sc.progs), len(sc.links), sc.cgroupID)
}

// Snapshot takes this node's Scope from opts.PinDir and opts.CgroupRoot.
// Call it before removing anything. On error the returned Scope holds what
// could be found: it may miss objects, never include another node's.
func Snapshot(opts Options) (*Scope, error) {
	sc := newScope()
	var errs []error
	if err := sc.addPins(opts.PinDir); err != nil {
		errs = append(errs, err)
	}
	if err := sc.addCgroupRoot(opts.CgroupRoot); err != nil {
		errs = append(errs, err)
	}
	// Programs by the map rule, then links by program or cgroup.
	sc.scanPrograms(nil)
	it := new(link.Iterator)
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || !sc.hasLink(info) {
			continue
		}
		sc.links[info.ID] = true
		if strings.HasPrefix(progName(info.Program), NamePrefix) {
			sc.progs[info.Program] = true
		}
	}
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("iterate links: %w", err))
	}
	it.Close()
	for id := range sc.progs {
		ids, _ := progInfo(id)
		for _, m := range ids {
			sc.maps[m] = true
		}
	}
	return sc, errors.Join(errs...)
}

// addPins records every map, program and link pinned under dir (the node's
// own bpffs: another node's pins are in another bpffs instance).
func (sc *Scope) addPins(dir string) error {
	if dir == "" {
		return nil
	}
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			info, err := l.Info()
			l.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("pinned link %s: %w", path, err))
				return nil
			}
			sc.links[info.ID] = true
			sc.progs[info.Program] = true
			return nil
		}
		if m, err := ebpf.LoadPinnedMap(path, nil); err == nil {
			info, err := m.Info()
			m.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("pinned map %s: %w", path, err))
				return nil
			}
			if id, ok := info.ID(); ok {
				sc.pinnedMaps[id] = true
				sc.maps[id] = true
			}
			return nil
		}
		if p, err := ebpf.LoadPinnedProgram(path, nil); err == nil {
			info, err := p.Info()
			p.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("pinned program %s: %w", path, err))
				return nil
			}
			if id, ok := info.ID(); ok {
				sc.progs[id] = true
			}
		}
		// Anything else (a plain file) is removed with the dir, and is no
		// kernel object.
		return nil
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("walk %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

// addCgroupRoot records the id of the cgroup at root and the kebpf_
// programs attached there, by link or by legacy BPF_PROG_ATTACH. In the
// node's cgroup namespace root is the node's own cgroup, so these are this
// node's attachments; other nodes attach at their own cgroups.
func (sc *Scope) addCgroupRoot(root string) error {
	if root == "" {
		return nil
	}
	if ok, _ := mounts.IsCgroup2(root); !ok {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Stat(root, &st); err != nil {
		return fmt.Errorf("stat cgroup %s: %w", root, err)
	}
	sc.cgroupID = st.Ino
	cg, err := os.Open(root)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", root, err)
	}
	defer cg.Close()
	for _, at := range cgroupAttachTypes {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			continue // attach type unknown to this kernel
		}
		for _, ap := range res.Programs {
			if !strings.HasPrefix(progName(ap.ID), NamePrefix) {
				continue
			}
			sc.progs[ap.ID] = true
			if lid, ok := ap.LinkID(); ok {
				sc.links[lid] = true
			}
		}
	}
	return nil
}

// scanPrograms walks every program on the kernel (there is no per-node
// list), adds to sc those in scope by the map rule, and calls fn (when not
// nil) for each program in scope.
func (sc *Scope) scanPrograms(fn func(ebpf.ProgramID, string)) {
	for id, err := ebpf.ProgramGetNextID(0); err == nil; id, err = ebpf.ProgramGetNextID(id) {
		mapIDs, name := progInfo(id)
		if !sc.progs[id] && !(strings.HasPrefix(name, NamePrefix) && sc.usesPinnedMap(mapIDs)) {
			continue
		}
		sc.progs[id] = true
		if fn != nil {
			fn(id, name)
		}
	}
}

func (sc *Scope) usesPinnedMap(ids []ebpf.MapID) bool {
	for _, id := range ids {
		if sc.pinnedMaps[id] {
			return true
		}
	}
	return false
}

// hasLink reports whether the link described by info is this node's: known
// from the snapshot, running one of our programs, or attached at our cgroup
// root with a kebpf_ program.
func (sc *Scope) hasLink(info *link.Info) bool {
	if sc == nil {
		return false
	}
	if sc.links[info.ID] || sc.progs[info.Program] {
		return true
	}
	if cg := info.Cgroup(); cg != nil && sc.cgroupID != 0 && cg.CgroupId == sc.cgroupID {
		return strings.HasPrefix(progName(info.Program), NamePrefix)
	}
	return false
}

// progInfo is the map IDs and name of program id (nil, "" when it is gone).
func progInfo(id ebpf.ProgramID) ([]ebpf.MapID, string) {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return nil, ""
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return nil, ""
	}
	ids, _ := info.MapIDs()
	return ids, info.Name
}
