//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// pinnedMaps carry state across restarts; Detach unpins them. The L7
// steering maps this package reads (pins.SharedL7Maps: kebpf_l7_dst,
// kebpf_l7_envcg, kebpf_l7_orig) are pinned in the same directory but
// belong to bpf/sockmap: neither Detach nor DetachPinned unpins or clears
// them (README, "L7 steering").
var pinnedMaps = []string{
	NetpolMapKebpfNpEp, NetpolMapKebpfNpPol, NetpolMapKebpfNpCt, NetpolMapKebpfNpHost,
	NetpolMapKebpfNpCnt, NetpolMapKebpfNpVerd, NetpolMapKebpfNpEvents, NetpolMapKebpfNpIp,
	NetpolMapKebpfNpL7, NetpolMapKebpfNpLost,
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

// LinkPinPath is where the link of ifindex's hook ("from" or "to") is pinned.
func LinkPinPath(pinDir string, ifindex int, hook string) string {
	return filepath.Join(pinDir, "links", LinkPinPrefix+strconv.Itoa(ifindex)+"_"+hook)
}

// DetachPinned removes every netpol link and map pin under pinDir, and
// every netpol clsact filter (TCA_BPF_NAME kebpf_np_*) on the interfaces of
// the caller's network namespace, without loading anything (the agent's
// `cleanup`). Clsact qdiscs stay. Missing pins are not an error.
func DetachPinned(pinDir string) error {
	var errs []error
	if err := detachAllClsact(); err != nil {
		errs = append(errs, fmt.Errorf("detach clsact filters: %w", err))
	}
	return errors.Join(append(errs, detachPinnedLinks(pinDir), pins.RemoveFiles(MapPinPaths(pinDir)))...)
}

func detachPinnedLinks(pinDir string) error {
	dir := filepath.Join(pinDir, "links")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	var errs []error
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), LinkPinPrefix) {
			continue
		}
		pin := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			// Not a link we can load: at least drop the pin.
			if rerr := os.Remove(pin); rerr != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", pin, rerr))
			}
			continue
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
		}
	}
	return errors.Join(errs...)
}
