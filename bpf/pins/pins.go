// Package pins holds the link handling every datapath package of bpf/
// shares: links are pinned so the datapath outlives the agent, which makes
// attaching idempotently, removing one and recognising an existing one the
// same job everywhere.
package pins

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
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

// AttachCgroup attaches prog (named name in errors) at the cgroup v2
// directory cgroupPath and pins the link at pin, idempotently across
// restarts: a pinned link for the same cgroup gets prog swapped in (no
// window without the program, never two attachments); one for another
// cgroup, or unreadable, is detached and replaced. created reports a new
// attachment (what a failed caller must undo).
func AttachCgroup(name, pin, cgroupPath string, at ebpf.AttachType, prog *ebpf.Program) (l link.Link, created bool, err error) {
	l, err = link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		same, serr := SameCgroup(l, cgroupPath)
		if serr == nil && same {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, false, fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return l, false, nil
		}
		// The pin points elsewhere (cgroup root changed) or is unreadable:
		// drop it so the fresh attachment below is the only one.
		if err := DetachAndClose(l); err != nil {
			return nil, false, fmt.Errorf("replace pinned link %s: %w", pin, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, false, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: at, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attach %s to %s: %w", name, cgroupPath, err)
	}
	if err := l.Pin(pin); err != nil {
		// Without a pin the attachment would vanish with this process,
		// silently breaking the restart guarantee; refuse instead.
		l.Close()
		return nil, false, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, true, nil
}

// LoadError is the error of loading what, with the verifier's whole log
// when the verifier refused a program.
func LoadError(what string, err error) error {
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return fmt.Errorf("load %s: %+v", what, verr)
	}
	return fmt.Errorf("load %s: %w", what, err)
}

// MkdirAll creates the pin directories dirs (on a bpffs), private to root.
func MkdirAll(dirs ...string) error {
	for _, dir := range dirs {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create pin dir: %w", err)
		}
	}
	return nil
}
