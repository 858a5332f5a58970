//go:build linux

package sockmap

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (steered destinations and live pairs survive a restart), otherwise created
// and pinned. pinDir must be on a bpffs.
func Load(pinDir string) (*Objects, error) {
	if err := pins.MkdirAll(MapPinDir(pinDir), filepath.Join(pinDir, "links")); err != nil {
		return nil, err
	}
	spec, err := LoadSockmap()
	if err != nil {
		return nil, fmt.Errorf("load sockmap spec: %w", err)
	}
	o := &Objects{pinDir: pinDir, links: map[string]link.Link{}}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		return nil, pins.LoadError("sockmap", err)
	}
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
