//go:build linux

// Package features probes the running kernel for what the datapath needs.
// Every probe loads something tiny into the kernel, so results reflect this
// kernel and these privileges, not a version table.
package features

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	ebpffeatures "github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
)

// Feature names as they appear in NodeState.Status.Features.
const (
	BPFSyscall         = "bpf-syscall"
	BTF                = "btf"
	CgroupV2           = "cgroup-v2"
	ProgCgroupSockAddr = "prog-cgroup-sock-addr"
	ProgCgroupSock     = "prog-cgroup-sock"
	ProgSchedCLS       = "prog-sched-cls"
	ProgSockOps        = "prog-sock-ops"
	ProgSkMsg          = "prog-sk-msg"
	ProgCgroupSockopt  = "prog-cgroup-sockopt"
	MapSockHash        = "map-sockhash"
	MapLPMTrie         = "map-lpm-trie"
	MapLRUHash         = "map-lru-hash"
	MapRingBuf         = "map-ringbuf"
	MapPerCPUArray     = "map-percpu-array"
	LinkTCX            = "link-tcx"
	LinkCgroup         = "link-cgroup"
	// Helpers and kfuncs, probed by loading a program that calls them (a
	// kernel version says nothing about backports or config).
	HelperSetRetval           = "helper-set-retval"             // service-lb: connect() to a Service without endpoints fails with ECONNREFUSED (5.18)
	HelperSkbAncestorCgroupID = "helper-skb-ancestor-cgroup-id" // policy: tells Envoy's connections (l7) apart
	HelperSockHashUpdate      = "helper-sock-hash-update"       // l7: sockets enter the sockhash
	HelperMsgRedirectHash     = "helper-msg-redirect-hash"      // l7: payload short-circuited between sockets
	KfuncSockDestroy          = "kfunc-sock-destroy"            // service-lb: UDP sockets of a removed backend are closed (6.5)
)

// Required are the features without which the agent cannot run its
// foundation datapath (sockstats); it stays NotReady when one is missing.
var Required = []string{BPFSyscall, CgroupV2, ProgCgroupSock, MapPerCPUArray}

type probe struct {
	name string
	run  func() error
}

// Probe runs every probe; cgroupRoot is where the agent attaches cgroup
// programs (--cgroup-root). Features come back in a fixed order, each
// unavailable one with the reason in Detail.
func Probe(cgroupRoot string) []apiv1.KernelFeature {
	probes := []probe{
		{BPFSyscall, probeSyscall},
		{BTF, func() error { _, err := btf.LoadKernelSpec(); return err }},
		{CgroupV2, func() error { return probeCgroup2(cgroupRoot) }},
		{ProgCgroupSockAddr, progType(ebpf.CGroupSockAddr)},
		{ProgCgroupSock, progType(ebpf.CGroupSock)},
		{ProgSchedCLS, progType(ebpf.SchedCLS)},
		{ProgSockOps, progType(ebpf.SockOps)},
		{ProgSkMsg, progType(ebpf.SkMsg)},
		{ProgCgroupSockopt, progType(ebpf.CGroupSockopt)},
		{MapSockHash, mapType(ebpf.SockHash)},
		{MapLPMTrie, mapType(ebpf.LPMTrie)},
		{MapLRUHash, mapType(ebpf.LRUHash)},
		{MapRingBuf, mapType(ebpf.RingBuf)},
		{MapPerCPUArray, mapType(ebpf.PerCPUArray)},
		{LinkTCX, probeTCX},
		{LinkCgroup, probeCgroupLink},
		{HelperSetRetval, helper(ebpf.CGroupSockAddr, asm.FnSetRetval)},
		{HelperSkbAncestorCgroupID, helper(ebpf.SchedCLS, asm.FnSkbAncestorCgroupId)},
		{HelperSockHashUpdate, helper(ebpf.SockOps, asm.FnSockHashUpdate)},
		{HelperMsgRedirectHash, helper(ebpf.SkMsg, asm.FnMsgRedirectHash)},
		{KfuncSockDestroy, func() error { return kfunc("bpf_sock_destroy") }},
	}
	out := make([]apiv1.KernelFeature, 0, len(probes))
	for _, p := range probes {
		f := apiv1.KernelFeature{Name: p.name, Available: true}
		if err := p.run(); err != nil {
			f.Available = false
			f.Detail = detail(err)
		}
		out = append(out, f)
	}
	return out
}

// MissingRequired returns one message per required feature that is absent.
func MissingRequired(fs []apiv1.KernelFeature) []string {
	var msgs []string
	for _, name := range Required {
		found := false
		for _, f := range fs {
			if f.Name != name {
				continue
			}
			found = true
			if !f.Available {
				msgs = append(msgs, fmt.Sprintf("required kernel feature %s unavailable: %s", name, f.Detail))
			}
		}
		if !found {
			msgs = append(msgs, fmt.Sprintf("required kernel feature %s was not probed", name))
		}
	}
	return msgs
}

// detail turns a probe error into a message an operator can act on.
func detail(err error) string {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, os.ErrPermission):
		return "permission denied: the agent needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN (" + err.Error() + ")"
	case errors.Is(err, ebpf.ErrNotSupported):
		return "not supported by this kernel (" + err.Error() + ")"
	default:
		return err.Error()
	}
}

func progType(pt ebpf.ProgramType) func() error {
	return func() error { return ebpffeatures.HaveProgramType(pt) }
}

// helper probes whether programs of type pt may call fn.
func helper(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
	return func() error { return ebpffeatures.HaveProgramHelper(pt, fn) }
}

// kfunc probes whether the kernel exports the kfunc name in its BTF (the
// loader resolves kfuncs by BTF name; a missing one fails the load).
func kfunc(name string) error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("kernel BTF: %w", err)
	}
	var fn *btf.Func
	if err := spec.TypeByName(name, &fn); err != nil {
		return fmt.Errorf("kfunc %s: %w", name, ebpf.ErrNotSupported)
	}
	return nil
}

func mapType(mt ebpf.MapType) func() error {
	return func() error { return ebpffeatures.HaveMapType(mt) }
}

// probeSyscall creates the smallest possible map: it fails with ENOSYS
// without CONFIG_BPF_SYSCALL and with EPERM without the capabilities, which
// the feature package's cached probes would report as "not supported".
func probeSyscall() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		return fmt.Errorf("create array map: %w", err)
	}
	return m.Close()
}

// probeCgroup2 accepts a cgroup2 mount at root, or a kernel that can mount
// cgroup2 (then `kebpf-agent mount` has not run yet; the detail says so via
// the attach error, but the kernel feature itself is present).
func probeCgroup2(root string) error {
	ok, err := mounts.IsCgroup2(root)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	has, err := kernelHasFS("cgroup2")
	if err != nil {
		return err
	}
	if !has {
		return fmt.Errorf("kernel has no cgroup2 filesystem (not in /proc/filesystems)")
	}
	return nil
}

func kernelHasFS(name string) (bool, error) {
	f, err := os.Open("/proc/filesystems")
	if err != nil {
		return false, fmt.Errorf("read /proc/filesystems: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 0 && fields[len(fields)-1] == name {
			return true, nil
		}
	}
	return false, sc.Err()
}

// probeTCX asks the kernel to create a tcx link on an ifindex that cannot
// exist: ENODEV means the attach type is known, anything else that it is not.
func probeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load sched_cls program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: 0x7fffffff, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// probeCgroupLink checks that cgroup programs attach through bpf_link
// (pinnable, 5.7+); without it the attachment cannot outlive the agent.
func probeCgroupLink() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.CGroupSock,
		AttachType:   ebpf.AttachCGroupInetSockCreate,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load cgroup_sock program: %w", err)
	}
	defer prog.Close()
	// A target fd that is not a cgroup gets EBADF from a kernel that knows
	// BPF_LINK_CREATE for cgroups and EINVAL from one that does not; nothing
	// gets attached either way.
	notCgroup, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer notCgroup.Close()
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(notCgroup.Fd()), Program: prog, Attach: ebpf.AttachCGroupInetSockCreate})
	if err == nil {
		l.Close()
		return errors.New("cgroup link on a non-cgroup fd succeeded unexpectedly")
	}
	if errors.Is(err, unix.EBADF) {
		return nil
	}
	return err
}
