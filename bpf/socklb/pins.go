//go:build linux

package socklb

import (
	"errors"
	"path/filepath"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// pinnedMaps are the maps that carry state across restarts.
var pinnedMaps = []string{
	SocklbMapKebpfLbSvc4, SocklbMapKebpfLbSvc6, SocklbMapKebpfLbBe,
	SocklbMapKebpfLbAff, SocklbMapKebpfLbRev, SocklbMapKebpfLbStats,
	SocklbMapKebpfLbEvents, SocklbMapKebpfLbLost, SocklbMapKebpfLbCfg,
}

// LinkPinPath is where the link of hook (e.g. "connect4") is pinned.
func LinkPinPath(pinDir, hook string) string {
	return filepath.Join(pins.LinkDir(pinDir), LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string { return pins.MapDir(pinDir) }

// MapPinPaths lists the pin files of the persistent maps.
func MapPinPaths(pinDir string) []string { return pins.MapPaths(pinDir, pinnedMaps) }

// DetachPinned detaches and unpins every socklb link and unpins its maps
// under pinDir without loading anything (for `kebpf-agent cleanup`).
// Missing pins are not an error.
func DetachPinned(pinDir string) error {
	return errors.Join(detachPinnedLinks(pinDir), pins.RemoveFiles(MapPinPaths(pinDir)))
}

func detachPinnedLinks(pinDir string) error {
	return pins.DetachPinnedLinks(pins.HookLinkPaths(pinDir, LinkPinPrefix, hooks))
}
