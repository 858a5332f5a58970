//go:build linux

package socklb

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// pinnedMaps are the maps that carry state across restarts.
var pinnedMaps = []string{
	SocklbMapKebpfLbSvc4, SocklbMapKebpfLbSvc6, SocklbMapKebpfLbBe,
	SocklbMapKebpfLbAff, SocklbMapKebpfLbRev, SocklbMapKebpfLbStats,
}

// LinkPinPath is where the link of hook (e.g. "connect4") is pinned.
func LinkPinPath(pinDir, hook string) string {
	return filepath.Join(pinDir, "links", LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string {
	return filepath.Join(pinDir, "maps")
}

// MapPinPaths lists the pin files of the persistent maps.
func MapPinPaths(pinDir string) []string {
	paths := make([]string, len(pinnedMaps))
	for i, m := range pinnedMaps {
		paths[i] = filepath.Join(MapPinDir(pinDir), m)
	}
	return paths
}

// DetachPinned detaches and unpins every socklb link and unpins its maps
// under pinDir without loading anything (for `kebpf-agent cleanup`).
// Missing pins are not an error.
func DetachPinned(pinDir string) error {
	return errors.Join(detachPinnedLinks(pinDir), pins.RemoveFiles(MapPinPaths(pinDir)))
}

func detachPinnedLinks(pinDir string) error {
	var errs []error
	for _, h := range hooks {
		pin := LinkPinPath(pinDir, h.name)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", pin, err))
			continue
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach pinned link %s: %w", pin, err))
		}
	}
	return errors.Join(errs...)
}
