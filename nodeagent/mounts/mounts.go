//go:build linux

// Package mounts makes sure the filesystems the datapath lives on exist:
// a bpffs for pins and a cgroup2 mount to attach cgroup programs at.
package mounts

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Filesystem magics from <linux/magic.h>.
const (
	BPFFSMagic   = 0xcafe4a11
	Cgroup2Magic = 0x63677270
)

// Defaults from the contract.
const (
	DefaultBPFFS      = "/sys/fs/bpf"
	DefaultCgroupRoot = "/run/kubectl-ebpf/cgroupv2"
	DefaultPinDir     = "/sys/fs/bpf/kubectl-ebpf"
)

// FSType returns the filesystem magic of the filesystem path lives on.
func FSType(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(st.Type), nil
}

// IsBPFFS reports whether path lives on a bpffs.
func IsBPFFS(path string) (bool, error) { return isFS(path, BPFFSMagic) }

// IsCgroup2 reports whether path lives on a cgroup2 filesystem.
func IsCgroup2(path string) (bool, error) { return isFS(path, Cgroup2Magic) }

func isFS(path string, magic int64) (bool, error) {
	t, err := FSType(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return t == magic, nil
}

// MountPoint is one line of /proc/self/mountinfo.
type MountPoint struct {
	Path   string
	FSType string
	Source string
}

// MountPoints lists the mounts of this process's mount namespace whose mount
// point is exactly path (a path can be mounted over more than once).
func MountPoints(path string) ([]MountPoint, error) {
	path = filepath.Clean(path)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var out []MountPoint
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, postFields := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(postFields) < 2 {
			continue
		}
		if unescape(fields[4]) != path {
			continue
		}
		out = append(out, MountPoint{Path: path, FSType: postFields[0], Source: postFields[1]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
}

// unescape undoes the octal escapes mountinfo uses for space, tab, \n and \\.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			okOct := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					okOct = false
					break
				}
				v = v*8 + (c - '0')
			}
			if okOct {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// EnsureBPFFS mounts a bpffs at path unless path already is on one.
// It reports whether it mounted.
func EnsureBPFFS(path string) (bool, error) {
	ok, err := IsBPFFS(path)
	if err != nil || ok {
		return false, err
	}
	if err := os.MkdirAll(path, 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", path, err)
	}
	if err := unix.Mount("bpffs", path, "bpf", 0, "mode=0700"); err != nil {
		return false, fmt.Errorf("mount bpffs at %s: %w", path, err)
	}
	return true, nil
}

// EnsureCgroup2 mounts cgroup2 at path unless path already is on one.
//
// The cgroup2 root a fresh mount shows is the root of the calling thread's
// cgroup namespace. In a container that is the container's own cgroup, so
// attaching there would only see the container's sockets; pass the host's
// namespace (e.g. /hostproc/1/ns/cgroup) as cgroupNS to mount the host root.
// It reports whether it mounted.
func EnsureCgroup2(path, cgroupNS string) (bool, error) {
	ok, err := IsCgroup2(path)
	if err != nil || ok {
		return false, err
	}
	if err := os.MkdirAll(path, 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", path, err)
	}
	mount := func() error {
		if err := unix.Mount("cgroup2", path, "cgroup2", 0, ""); err != nil {
			return fmt.Errorf("mount cgroup2 at %s: %w", path, err)
		}
		return nil
	}
	if cgroupNS == "" {
		return true, mount()
	}
	if err := inCgroupNS(cgroupNS, mount); err != nil {
		return false, err
	}
	return true, nil
}

// inCgroupNS runs fn on a thread that joined the cgroup namespace at nsPath.
// The thread is never unlocked, so the Go runtime discards it afterwards
// instead of reusing a thread in a foreign namespace.
func inCgroupNS(nsPath string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(nsPath)
		if err != nil {
			errc <- fmt.Errorf("open cgroup namespace: %w", err)
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWCGROUP); err != nil {
			errc <- fmt.Errorf("enter cgroup namespace %s: %w", nsPath, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// EnsurePinDir creates pinDir (mode 0700) after checking it is on a bpffs;
// pins on any other filesystem fail with a confusing EPERM later.
func EnsurePinDir(pinDir string) error {
	parent := pinDir
	for {
		if _, err := os.Stat(parent); err == nil {
			break
		}
		next := filepath.Dir(parent)
		if next == parent {
			break
		}
		parent = next
	}
	ok, err := IsBPFFS(parent)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("pin dir %s: %s is not on a bpffs (run `kebpf-agent mount` first)", pinDir, parent)
	}
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		return fmt.Errorf("create pin dir %s: %w", pinDir, err)
	}
	return nil
}

// Unmount unmounts the mounts of fstype stacked at path, topmost first,
// and stops at a mount of another type (not ours to remove). It returns how
// many it removed.
func Unmount(path, fstype string) (int, error) {
	n := 0
	for {
		mps, err := MountPoints(path)
		if err != nil {
			return n, err
		}
		// mountinfo lists stacked mounts bottom to top.
		if len(mps) == 0 || mps[len(mps)-1].FSType != fstype {
			return n, nil
		}
		if err := unix.Unmount(path, 0); err != nil {
			return n, fmt.Errorf("unmount %s: %w", path, err)
		}
		n++
	}
}
