// Package pins holds the link and map handling every datapath package of
// bpf/ shares: links and maps are pinned so the datapath outlives the agent,
// which makes attaching idempotently, removing one, recognising an existing
// one and carrying a pinned map's state into a new layout (migrate.go) the
// same job everywhere.
package pins

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// DetachAndClose unpins l, detaches it and closes this process's handle.
func DetachAndClose(l link.Link) error {
	var errs []error
	if err := l.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin: %w", err))
	}
	// Detach explicitly: another process (an old agent still shutting down)
	// may hold an fd, and closing ours alone would leave the program attached.
	// ENOLINK: the hook is gone already (a removed interface or cgroup).
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) && !errors.Is(err, unix.ENOLINK) {
		errs = append(errs, fmt.Errorf("detach: %w", err))
	}
	if err := l.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close: %w", err))
	}
	return errors.Join(errs...)
}

// SameCgroup reports whether l is a cgroup link attached at cgroupPath.
// On cgroup v2 the cgroup ID is the inode number of its directory.
func SameCgroup(l link.Link, cgroupPath string) (bool, error) {
	info, err := l.Info()
	if err != nil {
		return false, err
	}
	cg := info.Cgroup()
	if cg == nil {
		return false, fmt.Errorf("link %d is not a cgroup link", info.ID)
	}
	fi, err := os.Stat(cgroupPath)
	if err != nil {
		return false, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false, fmt.Errorf("stat %s: no inode", cgroupPath)
	}
	return cg.CgroupId == st.Ino, nil
}

// RemoveFiles unpins the given pin paths (maps pinned by name); missing pins
// are not an error, so a cleanup can run whatever an earlier agent left.
func RemoveFiles(paths []string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// AttachCgroup attaches prog (named name in errors) at the cgroup v2
// directory cgroupPath and pins the link at pin, idempotently across
// restarts: a pinned link for the same cgroup gets prog swapped in (no
// window without the program, never two attachments); one for another
// cgroup, or unreadable, is detached and replaced. created reports a new
// attachment (what a failed caller must undo).
func AttachCgroup(name, pin, cgroupPath string, at ebpf.AttachType, prog *ebpf.Program) (l link.Link, created bool, err error) {
	l, err = link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		same, serr := SameCgroup(l, cgroupPath)
		if serr == nil && same {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, false, fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return l, false, nil
		}
		// The pin points elsewhere (cgroup root changed) or is unreadable:
		// drop it so the fresh attachment below is the only one.
		if err := DetachAndClose(l); err != nil {
			return nil, false, fmt.Errorf("replace pinned link %s: %w", pin, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, false, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: at, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attach %s to %s: %w", name, cgroupPath, err)
	}
	if err := l.Pin(pin); err != nil {
		// Without a pin the attachment would vanish with this process,
		// silently breaking the restart guarantee; refuse instead.
		l.Close()
		return nil, false, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, true, nil
}

// LoadError is the error of loading what, with the verifier's whole log
// when the verifier refused a program.
func LoadError(what string, err error) error {
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return fmt.Errorf("load %s: %+v", what, verr)
	}
	return fmt.Errorf("load %s: %w", what, err)
}

// MkdirAll creates the pin directories dirs (on a bpffs), private to root.
func MkdirAll(dirs ...string) error {
	for _, dir := range dirs {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create pin dir: %w", err)
		}
	}
	return nil
}

// CgroupHook is one cgroup attachment of a datapath package.
type CgroupHook struct {
	Name   string // link pin suffix, e.g. "connect4"
	Prog   string // program name
	Attach ebpf.AttachType
}

// HookNames lists the hooks' names (link pin suffixes) in attach order.
func HookNames(hooks []CgroupHook) []string {
	names := make([]string, len(hooks))
	for i, h := range hooks {
		names[i] = h.Name
	}
	return names
}

// AttachCgroupHooks attaches every hook's program (looked up by prog) at
// cgroupPath, pinning each link at linkPin(hook name), idempotently (see
// AttachCgroup). On error it undoes only what it attached anew: swapped
// pinned links keep running the (equivalent) new program.
func AttachCgroupHooks(hooks []CgroupHook, linkPin func(string) string, cgroupPath string, prog func(string) *ebpf.Program) (map[string]link.Link, error) {
	links := map[string]link.Link{}
	var fresh []link.Link
	for _, h := range hooks {
		p := prog(h.Prog)
		if p == nil {
			CloseLinks(links)
			DetachAll(fresh)
			return nil, fmt.Errorf("attach %s: program not loaded", h.Prog)
		}
		l, created, err := AttachCgroup(h.Prog, linkPin(h.Name), cgroupPath, h.Attach, p)
		if err != nil {
			CloseLinks(links)
			DetachAll(fresh)
			return nil, err
		}
		if created {
			fresh = append(fresh, l)
		}
		links[h.Name] = l
	}
	return links, nil
}

// DetachAll detaches and unpins every link in ls (best effort: the undo of
// a failed attach).
func DetachAll(ls []link.Link) {
	for _, l := range ls {
		DetachAndClose(l)
	}
}

// CloseLinks closes this process's handles of links (attachments stay).
func CloseLinks(links map[string]link.Link) error {
	var errs []error
	for name, l := range links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close link %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// DetachLinks detaches, unpins and closes every link in links.
func DetachLinks(links map[string]link.Link) error {
	var errs []error
	for name, l := range links {
		if err := DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// DetachPinnedLinks detaches and unpins the links pinned at paths without
// loading any program (for cleanups); missing pins are not an error.
func DetachPinnedLinks(paths []string) error {
	return eachPinned(paths, "link", func(p string) (link.Link, error) { return link.LoadPinnedLink(p, nil) },
		func(l link.Link) error { return DetachAndClose(l) }, "detach pinned link")
}

// eachPinned loads the object (what) pinned at each of paths and hands it
// to fn, which owns it; missing pins are skipped, errors collected.
func eachPinned[T any](paths []string, what string, load func(string) (T, error), fn func(T) error, doing string) error {
	var errs []error
	for _, pin := range paths {
		x, err := load(pin)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned %s %s: %w", what, pin, err))
			continue
		}
		if err := fn(x); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", doing, pin, err))
		}
	}
	return errors.Join(errs...)
}

// SumPerCPU reads slots 0..n-1 of the per-CPU array m (named name in
// errors) and sums each over CPUs.
func SumPerCPU(m *ebpf.Map, name string, n int) ([]uint64, error) {
	sums := make([]uint64, n)
	for slot := range uint32(n) {
		var perCPU []uint64
		if err := m.Lookup(slot, &perCPU); err != nil {
			return nil, fmt.Errorf("lookup %s[%d]: %w", name, slot, err)
		}
		for _, v := range perCPU {
			sums[slot] += v
		}
	}
	return sums, nil
}

// MapDir is the directory a datapath's maps are pinned in (by name).
func MapDir(pinDir string) string { return filepath.Join(pinDir, "maps") }

// LinkDir is the directory a datapath's links are pinned in.
func LinkDir(pinDir string) string { return filepath.Join(pinDir, "links") }

// MapPaths lists the pin files of the maps named names under pinDir.
func MapPaths(pinDir string, names []string) []string {
	paths := make([]string, len(names))
	for i, m := range names {
		paths[i] = filepath.Join(MapDir(pinDir), m)
	}
	return paths
}

// HookLinkPaths lists the link pins of hooks (prefix+name under LinkDir).
func HookLinkPaths(pinDir, prefix string, hooks []CgroupHook) []string {
	paths := make([]string, len(hooks))
	for i, h := range hooks {
		paths[i] = filepath.Join(LinkDir(pinDir), prefix+h.Name)
	}
	return paths
}

// SharedL7Maps are the L7 steering maps bpf/sockmap fills and bpf/netpol
// reads (bpf/include/l7_shared.h declares them for both), pinned by name
// under MapDir: whichever package loads first creates them, the other reuses
// the pins. Neither package's Detach nor DetachPinned unpins them — a loaded
// netpol keeps its fds, and a map re-created by a later sockmap would be one
// netpol never sees; sockmap's clear their entries instead (steering off).
// Only the uninstall cleanup, which removes the whole pin directory,
// deletes them.
var SharedL7Maps = []string{"kebpf_l7_dst", "kebpf_l7_envcg", "kebpf_l7_orig", "kebpf_l7_active"}

// IsSharedL7Map reports whether name is one of SharedL7Maps.
func IsSharedL7Map(name string) bool { return slices.Contains(SharedL7Maps, name) }

// ClearMap deletes every entry of m (an array's values are zeroed). The
// keys are listed first, then deleted, so a concurrent insert may survive.
func ClearMap(m *ebpf.Map) error {
	if m.Type() == ebpf.Array {
		zero := make([]byte, m.ValueSize())
		for i := range m.MaxEntries() {
			if err := m.Update(i, zero, ebpf.UpdateExist); err != nil {
				return fmt.Errorf("clear map: %w", err)
			}
		}
		return nil
	}
	var keys [][]byte
	var cur []byte
	for range 2 * int(m.MaxEntries()) {
		var next []byte
		var err error
		if cur == nil {
			next, err = m.NextKeyBytes(nil)
		} else {
			next, err = m.NextKeyBytes(cur)
		}
		if err != nil {
			return fmt.Errorf("clear map: list keys: %w", err)
		}
		if next == nil {
			break
		}
		keys = append(keys, next)
		cur = next
	}
	var errs []error
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("clear map: %w", err))
		}
	}
	return errors.Join(errs...)
}

// ClearPinnedMaps clears the maps pinned at paths without unpinning them;
// missing pins are not an error.
func ClearPinnedMaps(paths []string) error {
	return eachPinned(paths, "map", func(p string) (*ebpf.Map, error) { return ebpf.LoadPinnedMap(p, nil) },
		func(m *ebpf.Map) error { defer m.Close(); return ClearMap(m) }, "clear")
}

// SharedL7Versions is the upgrade contract of SharedL7Maps, in the versioned
// map table of both packages that load them (whichever loads first
// migrates; the other finds a compatible pin). Their sizes are fixed in
// l7_shared.h, so only a new agent changes their layout. Bump a version
// (with an Upgrade) when its struct in l7_shared.h changes.
var SharedL7Versions = []VersionedMap{
	{Name: "kebpf_l7_dst", Version: 1, Policy: Migrate,
		Why: "steered destinations, written only by the agent (sockmap)"},
	{Name: "kebpf_l7_envcg", Version: 1, Policy: Migrate,
		Why: "Envoy's cgroups, written only by the agent (sockmap)"},
	{Name: "kebpf_l7_orig", Version: 1, Policy: MigrateCatchUp,
		Why: "original destinations of accepted Envoy sockets, written by the sockmap programs: netpol reads them for live proxied connections"},
	{Name: "kebpf_l7_active", Version: 1, Policy: Migrate,
		Why: "the steering switch, written only by the agent"},
}
