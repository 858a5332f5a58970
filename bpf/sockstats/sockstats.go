//go:build linux

// Package sockstats is the foundation datapath: a cgroup/sock_create program
// that counts sockets created per address family below a cgroup v2 directory.
//
// The link and the counter map are pinned under the agent's pin dir, so the
// program keeps counting while the agent restarts; a new agent swaps its
// freshly loaded program into the pinned link instead of attaching twice.
package sockstats

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

const (
	// ProgramName is the kernel name of the program (kebpf_ prefix, <=15 chars).
	ProgramName = SockstatsProgKebpfSockstat
	// MapName is the kernel name of the counter map, also its pin file name.
	MapName = SockstatsMapKebpfSockstats
	// LinkPinName is the file name of the pinned link under <pinDir>/links.
	LinkPinName = "sockstat"
)

// Map slots; keep in sync with the SLOT_* enum in sockstats.c.
const (
	slotInet uint32 = iota
	slotInet6
	slotOther
	slotMax
)

// Counts are the sockets created since the map was first pinned, summed
// over all CPUs.
type Counts struct {
	Inet  uint64
	Inet6 uint64
	Other uint64
}

// ByFamily returns the counts keyed by the metric label values
// "inet", "inet6" and "other".
func (c Counts) ByFamily() map[string]uint64 {
	return map[string]uint64{"inet": c.Inet, "inet6": c.Inet6, "other": c.Other}
}

// LinkPinPath is where the cgroup link is pinned.
func LinkPinPath(pinDir string) string {
	return filepath.Join(pinDir, "links", LinkPinName)
}

// MapPinDir is the directory the counter map is pinned in (by name).
func MapPinDir(pinDir string) string {
	return filepath.Join(pinDir, "maps")
}

// MapPinPath is the pin file of the counter map.
func MapPinPath(pinDir string) string {
	return filepath.Join(MapPinDir(pinDir), MapName)
}

// Objects is a loaded sockstats program with its (pinned) map and, after
// Attach, its cgroup link.
type Objects struct {
	objs   SockstatsObjects
	link   link.Link
	pinDir string
	// migration holds the map Load replaced until the link runs the new
	// program (Attach) or this process lets go (Close).
	migration *pins.Migration
}

// mapVersions: the counters are copied when their layout changes (a new
// SLOT_* grows the array: the existing slots keep their counts). Bump the
// version, with a pins.Upgrade, if the value type changes.
var mapVersions = []pins.VersionedMap{
	{Name: MapName, Version: 1, Policy: pins.Migrate,
		Why: "socket counters (array: increments between the copy and Attach are lost)"},
}

// Load loads the program into the kernel. The counter map is reused from
// <pinDir>/maps/kebpf_sockstats when it exists (counters survive restarts),
// otherwise created and pinned there. pinDir must be on a bpffs.
func Load(pinDir string) (*Objects, error) {
	if err := pins.MkdirAll(MapPinDir(pinDir), filepath.Dir(LinkPinPath(pinDir))); err != nil {
		return nil, err
	}
	o := &Objects{pinDir: pinDir}
	spec, err := LoadSockstats()
	if err != nil {
		return nil, fmt.Errorf("load sockstats spec: %w", err)
	}
	// Load takes no options: the migration logs to slog.Default().
	mg, err := pins.MigrateMaps(spec, MapPinDir(pinDir), mapVersions, slog.Default())
	if err != nil {
		return nil, err
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, opts); err != nil {
		return nil, errors.Join(pins.LoadError(ProgramName, err), mg.Abort())
	}
	o.migration = mg
	return o, nil
}

// finishMigration releases the map Load replaced (no-op when none).
func (o *Objects) finishMigration() error {
	err := o.migration.Finish()
	o.migration = nil
	return err
}

// Attach attaches the program at the cgroup v2 directory cgroupPath and pins
// the link. It is idempotent across restarts: when a pinned link exists for
// the same cgroup, the new program is swapped into it atomically (no window
// without counting, never two attachments); a pinned link for another cgroup
// is detached and replaced.
func (o *Objects) Attach(cgroupPath string) error {
	if o.link != nil {
		return fmt.Errorf("attach %s: already attached", ProgramName)
	}
	l, _, err := pins.AttachCgroup(ProgramName, LinkPinPath(o.pinDir), cgroupPath, ebpf.AttachCGroupInetSockCreate, o.objs.KebpfSockstat)
	if err != nil {
		return err
	}
	o.link = l
	return o.finishMigration()
}

// Attached reports whether Attach succeeded.
func (o *Objects) Attached() bool { return o.link != nil }

// Program is the loaded program (for tests and introspection).
func (o *Objects) Program() *ebpf.Program { return o.objs.KebpfSockstat }

// Counts reads the per-CPU counters and sums them.
func (o *Objects) Counts() (Counts, error) {
	return ReadCounts(o.objs.KebpfSockstats)
}

// ReadCounts sums the per-CPU counters of a kebpf_sockstats map, e.g. one
// opened with ebpf.LoadPinnedMap(MapPinPath(pinDir), nil).
func ReadCounts(m *ebpf.Map) (Counts, error) {
	sums, err := pins.SumPerCPU(m, MapName, int(slotMax))
	if err != nil {
		return Counts{}, err
	}
	return Counts{Inet: sums[slotInet], Inet6: sums[slotInet6], Other: sums[slotOther]}, nil
}

// Close releases this process's handles. The pinned link and map stay, so
// the program keeps running; use Detach to remove it.
func (o *Objects) Close() error {
	errs := []error{o.finishMigration()}
	if o.link != nil {
		if err := o.link.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close link: %w", err))
		}
		o.link = nil
	}
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// Detach removes the attachment and both pins, then closes everything.
func (o *Objects) Detach() error {
	var errs []error
	if o.link != nil {
		if err := pins.DetachAndClose(o.link); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", ProgramName, err))
		}
		o.link = nil
	} else if err := DetachPinned(o.pinDir); err != nil {
		errs = append(errs, err)
	}
	if err := o.objs.KebpfSockstats.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin %s: %w", MapName, err))
	}
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// DetachPinned detaches and unpins the link pinned under pinDir without
// loading anything. A missing pin is not an error.
func DetachPinned(pinDir string) error {
	pin := LinkPinPath(pinDir)
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	if err := pins.DetachAndClose(l); err != nil {
		return fmt.Errorf("detach pinned link %s: %w", pin, err)
	}
	return nil
}
