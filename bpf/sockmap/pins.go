//go:build linux

package sockmap

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// ownMaps are the maps pinned by name under <pinDir>/maps that only this
// package uses; Detach and DetachPinned unpin them.
var ownMaps = []string{
	SockmapMapKebpfL7Cfg, SockmapMapKebpfL7Cookie, SockmapMapKebpfL7Socks, SockmapMapKebpfL7Stats,
	SockmapMapKebpfL7Events, SockmapMapKebpfL7Lost,
}

// sharedMaps (pins.SharedL7Maps) are pinned by name too but shared with
// bpf/netpol: Detach and DetachPinned clear them, never unpin them (README:
// "Maps shared with bpf/netpol"). kebpf_l7_dst comes first: once it is
// empty nothing is steered and netpol stops dropping direct connections;
// kebpf_l7_active last (netpol's gate, only once nothing is steered).
var sharedMaps = []string{SockmapMapKebpfL7Dst, SockmapMapKebpfL7Orig, SockmapMapKebpfL7Envcg, SockmapMapKebpfL7Active}

// LinkPinPath is where the link of hook (e.g. "connect4") is pinned.
func LinkPinPath(pinDir, hook string) string {
	return filepath.Join(pins.LinkDir(pinDir), LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string { return pins.MapDir(pinDir) }

// MapPinPaths lists the pin files of the maps, the shared ones included.
func MapPinPaths(pinDir string) []string {
	return pins.MapPaths(pinDir, slices.Concat(ownMaps, sharedMaps))
}

// SharedMapPinPaths lists the pin files of the maps shared with bpf/netpol
// (pins.SharedL7Maps), which Detach and DetachPinned leave pinned.
func SharedMapPinPaths(pinDir string) []string { return pins.MapPaths(pinDir, sharedMaps) }

// DetachPinned detaches and unpins every sockmap link, detaches the sk_msg
// program from the pinned SOCKHASH, clears the maps shared with bpf/netpol
// and unpins the others under pinDir, without loading the objects (the
// agent's disable when this process loaded nothing, and `kebpf-agent
// cleanup`, which then removes the whole pin directory). Missing pins are
// not an error.
func DetachPinned(pinDir string) error {
	var errs []error
	// Steering off first: an empty kebpf_l7_dst steers nothing and lets
	// netpol pass direct connections again.
	errs = append(errs, pins.ClearPinnedMaps(SharedMapPinPaths(pinDir)[:1]))
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
	errs = append(errs, pins.ClearPinnedMaps(SharedMapPinPaths(pinDir)), pins.RemoveFiles(pins.MapPaths(pinDir, ownMaps)))
	return errors.Join(errs...)
}

func detachPinnedLinks(pinDir string) error {
	return pins.DetachPinnedLinks(pins.HookLinkPaths(pinDir, LinkPinPrefix, hooks))
}
