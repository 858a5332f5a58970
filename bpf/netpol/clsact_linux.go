//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// The clsact fallback for kernels without tcx (< 6.6): one cls_bpf filter
// in direct-action mode per hook, on the clsact qdisc of the host-side veth,
// through github.com/vishvananda/netlink.
//
// Our filter sits at a fixed (ClsactPriority, ClsactHandle) on each hook.
// Attaching again is `tc filter replace` for that slot (no NLM_F_EXCL), so
// the kernel replaces the filter in place (cls_bpf swaps the program under
// RCU): no moment with no filter or with two. Filters are found again, by
// a fresh process too, by their TCA_BPF_NAME: the program names, which all
// start with clsactNamePrefix. Other filters are never touched: deletes name
// the exact priority, protocol and handle of a filter of ours, so a foreign
// filter sharing our priority survives.
//
// The clsact qdisc is created when missing and never deleted: whether we
// created it cannot be known from a fresh process, other filters may have
// been added to it since, and deleting a qdisc deletes all its filters. An
// empty clsact costs one empty classifier walk per packet.
//
// Everything works on the network namespace of the calling thread: a zero
// netlink.Handle opens a socket per request there (tests hand in a handle
// of another namespace made with netlink.NewHandleAt).

const (
	// ClsactPriority is the tc priority of our filters: 1, the first to
	// run, as the tcx attachment runs at the head (a chained CNI program
	// must not redirect a packet past us). A foreign cls_bpf filter at the
	// same priority (Cilium's legacy tc mode uses 1) shares the classifier
	// with ours; a foreign filter of another kind or protocol at priority 1
	// makes attaching fail with the kernel's explanation.
	ClsactPriority uint16 = 1
	// ClsactHandle is our filters' handle ("ke"), within ClsactPriority.
	ClsactHandle uint32 = 0x6b65
	// clsactNamePrefix starts the TCA_BPF_NAME of every netpol filter.
	clsactNamePrefix = "kebpf_np_"
)

func init() {
	// The kernel's error text ("Parent Qdisc doesn't exists", ...) in the
	// errors of per-request sockets: the library's only switch for the
	// extended ack is this package variable.
	nl.EnableErrorMessageReporting = true
}

// clsactParents are the filter parents of the two hooks, in hooks order:
// [0] ingress of the host-side veth (from the pod), [1] egress (to it).
var clsactParents = [2]uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS}

// tcFilter is one filter from a dump.
type tcFilter struct {
	attrs  netlink.FilterAttrs
	kind   string
	name   string // TCA_BPF_NAME (cls_bpf only)
	progID uint32 // TCA_BPF_ID (cls_bpf only)
}

func (f tcFilter) prio() uint16 { return f.attrs.Priority }

func (f tcFilter) chain() uint32 {
	if f.attrs.Chain == nil {
		return 0
	}
	return *f.attrs.Chain
}

// ours reports whether f is a netpol filter (any priority or handle, so
// filters left by another version are found too).
func (f tcFilter) ours() bool { return f.kind == "bpf" && strings.HasPrefix(f.name, clsactNamePrefix) }

// inOurSlot reports whether f sits where attachClsact puts our filter.
func (f tcFilter) inOurSlot() bool {
	return f.prio() == ClsactPriority && f.attrs.Handle == ClsactHandle && f.chain() == 0
}

// byIndex names an interface by index only (the library resolves a name
// otherwise).
func byIndex(ifindex int) netlink.Link {
	return &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
}

// ensureClsact creates the clsact qdisc of ifindex unless one is there.
func ensureClsact(h *netlink.Handle, ifindex int) error {
	err := h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: ifindex,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_CLSACT,
	}})
	if errors.Is(err, unix.EEXIST) {
		// Ours from before, or someone else's (also when it is a plain
		// ingress qdisc: then adding the egress filter fails, saying so).
		return nil
	}
	if err != nil {
		return fmt.Errorf("create clsact qdisc on ifindex %d: %w", ifindex, err)
	}
	return nil
}

// dumpFilters lists the filters of one hook of ifindex. No qdisc: none.
func dumpFilters(h *netlink.Handle, ifindex int, parent uint32) ([]tcFilter, error) {
	fs, err := h.FilterList(byIndex(ifindex), parent)
	for try := 0; errors.Is(err, netlink.ErrDumpInterrupted) && try < 3; try++ {
		fs, err = h.FilterList(byIndex(ifindex), parent)
	}
	if err != nil {
		return nil, err
	}
	var out []tcFilter
	for _, f := range fs {
		a := *f.Attrs()
		if a.Handle == 0 {
			continue // the classifier itself (one message per priority), no filter
		}
		tf := tcFilter{attrs: a, kind: f.Type()}
		if b, ok := f.(*netlink.BpfFilter); ok {
			tf.name, tf.progID = b.Name, uint32(b.Id)
		}
		out = append(out, tf)
	}
	return out, nil
}

// setBPFFilter adds, or replaces in place, the direct-action cls_bpf filter
// at (prio, handle) on one hook of ifindex.
func setBPFFilter(h *netlink.Handle, ifindex int, parent uint32, prio uint16, handle uint32, prog *ebpf.Program, name string) error {
	return h.FilterReplace(&netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Handle:    handle,
			Priority:  prio,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	})
}

// delFilter deletes exactly f (its priority, protocol, handle and chain):
// never the whole classifier of a priority other filters may share.
func delFilter(h *netlink.Handle, f tcFilter) error {
	err := h.FilterDel(&netlink.BpfFilter{FilterAttrs: f.attrs, Fd: -1})
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
		return nil // gone meanwhile
	}
	return err
}

// attachClsact puts progs (in hooks order) on ifindex's clsact hooks,
// replacing our previous filters in place, and removes any other filter of
// ours there (another priority or handle: another version's).
func attachClsact(ifindex int, progs [2]*ebpf.Program) error {
	h := &netlink.Handle{}
	if err := ensureClsact(h, ifindex); err != nil {
		return err
	}
	for i, parent := range clsactParents {
		hk := hooks[i]
		fs, err := dumpFilters(h, ifindex, parent)
		if err != nil {
			return fmt.Errorf("list %s filters of ifindex %d: %w", hk.clsactDir, ifindex, err)
		}
		for _, f := range fs {
			if f.inOurSlot() && !f.ours() {
				return fmt.Errorf("attach %s to ifindex %d clsact %s: priority %d handle %#x holds a foreign %s filter %q",
					hk.suffix, ifindex, hk.clsactDir, ClsactPriority, ClsactHandle, f.kind, f.name)
			}
		}
		if err := setBPFFilter(h, ifindex, parent, ClsactPriority, ClsactHandle, progs[i], hk.prog); err != nil {
			return fmt.Errorf("attach %s to ifindex %d clsact %s: %w", hk.suffix, ifindex, hk.clsactDir, err)
		}
		for _, f := range fs {
			if f.ours() && !f.inOurSlot() {
				if err := delFilter(h, f); err != nil {
					return fmt.Errorf("delete stray filter %q (prio %d handle %#x) on ifindex %d: %w", f.name, f.prio(), f.attrs.Handle, ifindex, err)
				}
			}
		}
	}
	return nil
}

// detachClsact removes our filters from both clsact hooks of ifindex. A
// vanished interface or a missing qdisc is not an error.
func detachClsact(ifindex int) error { return detachClsactWith(&netlink.Handle{}, ifindex) }

func detachClsactWith(h *netlink.Handle, ifindex int) error {
	var errs []error
	for _, parent := range clsactParents {
		fs, err := dumpFilters(h, ifindex, parent)
		if errors.Is(err, unix.ENODEV) {
			return nil
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("list filters of ifindex %d: %w", ifindex, err))
			continue
		}
		for _, f := range fs {
			if f.ours() {
				if err := delFilter(h, f); err != nil {
					errs = append(errs, fmt.Errorf("delete filter %q on ifindex %d: %w", f.name, ifindex, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// detachAllClsact removes our filters from every clsact qdisc in the
// caller's network namespace (filters are not pinned: a fresh process finds
// them by name). Matching by name is safe where nodes share a kernel (kind):
// qdiscs and filters belong to a network namespace, each node has its own,
// and the host side of a node's pod veths is in the node's.
func detachAllClsact() error {
	h := &netlink.Handle{}
	ifs, err := clsactInterfaces(h)
	if err != nil {
		return err
	}
	var errs []error
	for _, ifindex := range ifs {
		if err := detachClsactWith(h, ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// clsactInterfaces lists the interfaces that have a clsact qdisc (one dump
// of all qdiscs instead of two filter dumps per interface).
func clsactInterfaces(h *netlink.Handle) ([]int, error) {
	qs, err := h.QdiscList(nil)
	for try := 0; errors.Is(err, netlink.ErrDumpInterrupted) && try < 3; try++ {
		qs, err = h.QdiscList(nil)
	}
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	var out []int
	for _, q := range qs {
		if q.Type() == "clsact" {
			out = append(out, q.Attrs().LinkIndex)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// DetachClsactFilters removes every filter of ours (kebpf_np_*) from the
// clsact qdiscs of the caller's network namespace, for `kebpf-agent
// cleanup`, which has no Objects and no pins naming them.
func DetachClsactFilters() error { return detachAllClsact() }
