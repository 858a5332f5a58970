// Package pins holds the link handling every datapath package of bpf/
// shares: links are pinned so the datapath outlives the agent, which makes
// removing one and recognising an existing one the same job everywhere.
package pins

import (
	"errors"
	"fmt"
	"os"
	"syscall"

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
