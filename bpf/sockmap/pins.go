//go:build linux

package sockmap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// pinnedMaps are the maps pinned by name under <pinDir>/maps.
var pinnedMaps = []string{
	SockmapMapKebpfL7Dst, SockmapMapKebpfL7Cfg, SockmapMapKebpfL7Envcg,
	SockmapMapKebpfL7Cookie, SockmapMapKebpfL7Orig, SockmapMapKebpfL7Socks,
	SockmapMapKebpfL7Stats,
}

// LinkPinPath is where the link of hook (e.g. "connect4") is pinned.
func LinkPinPath(pinDir, hook string) string {
	return filepath.Join(pins.LinkDir(pinDir), LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string { return pins.MapDir(pinDir) }

// MapPinPaths lists the pin files of the maps.
func MapPinPaths(pinDir string) []string { return pins.MapPaths(pinDir, pinnedMaps) }

// DetachPinned detaches and unpins every sockmap link, detaches the sk_msg
// program from the pinned SOCKHASH and unpins the maps under pinDir without
// loading the objects (for `kebpf-agent cleanup`). Missing pins are not an
// error.
func DetachPinned(pinDir string) error {
	var errs []error
	errs = append(errs, detachPinnedLinks(pinDir))
	socks := filepath.Join(MapPinDir(pinDir), SockmapMapKebpfL7Socks)
	m, err := ebpf.LoadPinnedMap(socks, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		errs = append(errs, fmt.Errorf("load pinned map %s: %w", socks, err))
	default:
		errs = append(errs, detachMsg(m))
		m.Close()
	}
	errs = append(errs, pins.RemoveFiles(MapPinPaths(pinDir)))
	return errors.Join(errs...)
}

func detachPinnedLinks(pinDir string) error {
	return pins.DetachPinnedLinks(pins.HookLinkPaths(pinDir, LinkPinPrefix, hooks))
}
