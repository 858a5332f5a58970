//go:build linux

package bench

import (
	"context"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The report's run metadata is read from the machine and the binaries at
// run time, so a results file says what it measured, not what a template
// assumed.

// kernelRelease is uname -r.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// cpuModel is the first "model name" of /proc/cpuinfo (absent on some
// architectures).
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// toolVersion is the first line a binary prints for its version flag, or
// why there is none.
func toolVersion(bin string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if err != nil {
		return "unknown (" + bin + ": " + err.Error() + ")"
	}
	return strings.TrimSpace(line)
}

// revision is the git revision the bench was built from: the build's VCS
// stamp (go build in a checkout), else git in the working directory (go
// test builds carry no stamp).
func revision() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v, commit, src := manifests.FromBuildInfo(bi); src == manifests.SourceVCS {
			if strings.HasSuffix(v, "-dirty") {
				commit += "-dirty"
			}
			return commit
		}
	}
	rev := toolVersion("git", "rev-parse", "HEAD")
	if strings.HasPrefix(rev, "unknown") {
		return "unknown"
	}
	if out, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(out) > 0 {
		rev += "-dirty"
	}
	return rev
}
