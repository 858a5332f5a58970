package local

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
)

// nodeMountDirs are host paths where workloads of a node (our agent's init
// container) mount filesystems: bpffs and the agent's cgroup2. On a real node
// they outlive the pods; when the host is only playing a node, Delete removes
// the mounts that were not there before, which also drops any BPF pins and
// links an interrupted test left behind.
var nodeMountDirs = []string{"/sys/fs/bpf", "/run/kubectl-ebpf"}

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	point  string
	shared bool
}

func readMountinfo() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 {
			continue
		}
		e := mountEntry{point: unescapeMount(fields[4])}
		// Optional fields sit between field 6 and the "-" separator.
		for _, opt := range fields[6:] {
			if opt == "-" {
				break
			}
			e.shared = e.shared || strings.HasPrefix(opt, "shared:")
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// recordMounts notes which mounts were private and which node mounts existed
// before Create, for restoreMounts.
func (rec *hostRecord) recordMounts() error {
	mounts, err := readMountinfo()
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	for _, m := range mounts {
		if !m.shared {
			rec.PrivateMounts = append(rec.PrivateMounts, m.point)
		}
	}
	rec.NodeMounts = mountsUnder(nodeMountDirs...)
	return nil
}

// restoreMounts unmounts node mounts made since Create and makes the mounts
// that were private before private again.
func (s *state) restoreMounts(ctx context.Context) error {
	rec, ok := s.readRecord()
	if !ok {
		return nil
	}
	before := map[string]bool{}
	for _, mp := range rec.NodeMounts {
		before[mp] = true
	}
	var errs []error
	for _, mp := range mountsUnder(nodeMountDirs...) {
		if before[mp] {
			continue
		}
		if err := syscall.Unmount(mp, 0); err != nil && !errors.Is(err, syscall.EINVAL) {
			if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			}
		}
	}
	if len(rec.PrivateMounts) == 0 {
		return errors.Join(errs...)
	}
	mounted := map[string]bool{}
	if mounts, err := readMountinfo(); err == nil {
		for _, m := range mounts {
			mounted[m.point] = true
		}
	}
	for _, mp := range rec.PrivateMounts {
		if !mounted[mp] {
			continue
		}
		if _, err := run(ctx, "mount", "--make-private", mp); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
