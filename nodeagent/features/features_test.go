//go:build linux

package features

import (
	"strings"
	"testing"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// hostCgroup2 is this machine's cgroup v2 mount (hybrid layout).
const hostCgroup2 = "/sys/fs/cgroup/unified"

// TestProbeAllPresent fails loudly when this kernel (6.18, root) lacks any
// feature we list: a missing one here is a probe bug, not a skip.
func TestProbeAllPresent(t *testing.T) {
	bpftest.RequireRoot(t)
	got := Probe(hostCgroup2)
	want := []string{
		BPFSyscall, BTF, CgroupV2,
		ProgCgroupSockAddr, ProgCgroupSock, ProgSchedCLS, ProgSockOps, ProgSkMsg, ProgCgroupSockopt,
		MapSockHash, MapLPMTrie, MapLRUHash, MapRingBuf, MapPerCPUArray,
		LinkTCX, LinkCgroup,
		HelperSetRetval, HelperSkbAncestorCgroupID, HelperSockHashUpdate, HelperMsgRedirectHash, KfuncSockDestroy,
	}
	if len(got) != len(want) {
		t.Fatalf("Probe returned %d features, want %d: %+v", len(got), len(want), got)
	}
	for i, name := range want {
		f := got[i]
		if f.Name != name {
			t.Errorf("feature %d = %q, want %q", i, f.Name, name)
		}
		if !f.Available {
			t.Errorf("feature %s unavailable on this kernel: %s", f.Name, f.Detail)
		}
		if f.Available && f.Detail != "" {
			t.Errorf("feature %s available but has detail %q", f.Name, f.Detail)
		}
	}
	if msgs := MissingRequired(got); len(msgs) != 0 {
		t.Errorf("MissingRequired = %q, want none", msgs)
	}
}

// TestKfuncAbsent: a kfunc the kernel does not export is reported as not
// supported, not as a crash or a pass.
func TestKfuncAbsent(t *testing.T) {
	bpftest.RequireRoot(t)
	if err := kfunc("bpf_kebpf_no_such_kfunc"); err == nil || !strings.Contains(detail(err), "not supported") {
		t.Errorf("kfunc probe of a missing kfunc: %v", err)
	}
}

func TestProbeCgroupRootNotMounted(t *testing.T) {
	bpftest.RequireRoot(t)
	// A plain directory is not a cgroup2 mount, but the kernel can mount
	// one, so the feature stays available (the mount step is what's missing).
	for _, f := range Probe(t.TempDir()) {
		if f.Name == CgroupV2 && !f.Available {
			t.Errorf("cgroup-v2 unavailable for an unmounted root: %s", f.Detail)
		}
	}
}

func TestMissingRequired(t *testing.T) {
	all := func(except string, detail string) []apiv1.KernelFeature {
		var fs []apiv1.KernelFeature
		for _, n := range Required {
			f := apiv1.KernelFeature{Name: n, Available: n != except}
			if !f.Available {
				f.Detail = detail
			}
			fs = append(fs, f)
		}
		return fs
	}
	tests := []struct {
		name     string
		features []apiv1.KernelFeature
		want     []string // substrings, one per message
	}{
		{name: "all present", features: all("", "")},
		{name: "no cgroup sock", features: all(ProgCgroupSock, "not supported"), want: []string{"prog-cgroup-sock unavailable: not supported"}},
		{name: "nothing probed", features: nil, want: []string{"bpf-syscall was not probed", "cgroup-v2 was not probed", "prog-cgroup-sock was not probed", "map-percpu-array was not probed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := MissingRequired(tt.features)
			if len(got) != len(tt.want) {
				t.Fatalf("MissingRequired = %q, want %d messages", got, len(tt.want))
			}
			for i, w := range tt.want {
				if !strings.Contains(got[i], w) {
					t.Errorf("message %d = %q, want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}
