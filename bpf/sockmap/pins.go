//go:build linux

package sockmap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

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
	return filepath.Join(pinDir, "links", LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string { return filepath.Join(pinDir, "maps") }

// MapPinPaths lists the pin files of the maps.
func MapPinPaths(pinDir string) []string {
	paths := make([]string, len(pinnedMaps))
	for i, m := range pinnedMaps {
		paths[i] = filepath.Join(MapPinDir(pinDir), m)
	}
	return paths
}

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
