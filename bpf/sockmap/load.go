//go:build linux

package sockmap

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (steered destinations and live pairs survive a restart), otherwise created
// and pinned. pinDir must be on a bpffs.
func Load(pinDir string) (*Objects, error) { return load(pinDir, nil) }

// load is Load with edit applied to the spec first (tests stand in an
// agent of another version with it: the map sizes are fixed in sockmap.c).
func load(pinDir string, edit func(*ebpf.CollectionSpec)) (*Objects, error) {
	if err := pins.MkdirAll(MapPinDir(pinDir), filepath.Join(pinDir, "links")); err != nil {
		return nil, err
	}
	spec, err := LoadSockmap()
	if err != nil {
		return nil, fmt.Errorf("load sockmap spec: %w", err)
	}
	if edit != nil {
		edit(spec)
	}
	o := &Objects{pinDir: pinDir, links: map[string]link.Link{}}
	// Pinned maps whose layout changed (an upgrade) are replaced by copies
	// the new programs accept; the old programs keep the old maps until
	// Attach switches the links (Attach or Close finishes the migration).
	// Load takes no options: the migration logs to slog.Default().
	mg, err := pins.MigrateMaps(spec, MapPinDir(pinDir), mapVersions, slog.Default())
	if err != nil {
		return nil, err
	}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		// Nothing runs on the new maps: put the old ones back.
		return nil, errors.Join(pins.LoadError("sockmap", err), mg.Abort())
	}
	o.migration = mg
	// Steered destinations pinned by an agent that predates
	// kebpf_l7_active: raise the flag for them.
	if k, err := o.objs.KebpfL7Dst.NextKeyBytes(nil); err == nil && k != nil {
		if err := o.setActive(); err != nil {
			o.Close()
			return nil, err
		}
	}
	return o, nil
}
