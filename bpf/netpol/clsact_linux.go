//go:build linux

package netpol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/rtattr"
)

// The clsact fallback for kernels without tcx (< 6.6): one cls_bpf filter
// in direct-action mode per hook, on the clsact qdisc of the host-side veth.
//
// Raw rtnetlink over golang.org/x/sys/unix, in the style of
// nodeagent/netpol/iface_linux.go: the module deliberately does not depend
// on vishvananda/netlink (or mdlayher/netlink, only an indirect dependency),
// and the few messages needed here (create a qdisc; add, dump and delete
// cls_bpf filters) do not justify one.
//
// Our filter sits at a fixed (ClsactPriority, ClsactHandle) on each hook.
// Attaching again sends RTM_NEWTFILTER without NLM_F_EXCL for that slot, so
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

// From linux/pkt_sched.h and linux/pkt_cls.h (not in x/sys/unix).
const (
	tcHClsact     uint32 = 0xFFFFFFF1 // TC_H_CLSACT (= TC_H_INGRESS)
	tcHMinIngress uint32 = 0xFFF2
	tcHMinEgress  uint32 = 0xFFF3

	tcaBPFFD    = 6  // TCA_BPF_FD
	tcaBPFName  = 7  // TCA_BPF_NAME
	tcaBPFFlags = 8  // TCA_BPF_FLAGS
	tcaBPFID    = 11 // TCA_BPF_ID

	tcaBPFFlagActDirect = 1 // TCA_BPF_FLAG_ACT_DIRECT

	sizeofTcMsg = 20 // struct tcmsg
)

func tcHMake(maj, min uint32) uint32 { return maj&0xFFFF0000 | min&0xFFFF }

// clsactParents are the filter parents of the two hooks, in hooks order:
// [0] ingress of the host-side veth (from the pod), [1] egress (to it).
var clsactParents = [2]uint32{tcHMake(tcHClsact, tcHMinIngress), tcHMake(tcHClsact, tcHMinEgress)}

// ethPAll is htons(ETH_P_ALL), the filter protocol: every packet.
var ethPAll = func() uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], unix.ETH_P_ALL)
	return binary.NativeEndian.Uint16(b[:])
}()

// tcFilter is one filter from a dump.
type tcFilter struct {
	ifindex int
	parent  uint32
	handle  uint32
	info    uint32 // TC_H_MAKE(prio << 16, protocol)
	chain   uint32
	kind    string
	name    string // TCA_BPF_NAME (cls_bpf only)
	progID  uint32 // TCA_BPF_ID (cls_bpf only)
}

func (f tcFilter) prio() uint16 { return uint16(f.info >> 16) }

// ours reports whether f is a netpol filter (any priority or handle, so
// filters left by another version are found too).
func (f tcFilter) ours() bool { return f.kind == "bpf" && strings.HasPrefix(f.name, clsactNamePrefix) }

// inOurSlot reports whether f sits where attachClsact puts our filter.
func (f tcFilter) inOurSlot() bool {
	return f.prio() == ClsactPriority && f.handle == ClsactHandle && f.chain == 0
}

// rtnl is a NETLINK_ROUTE socket in the netns of the calling thread.
type rtnl struct {
	fd  int
	seq uint32
}

func openRtnl() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink socket: %w", err)
	}
	// The kernel's error text ("Parent Qdisc doesn't exists", ...) in the
	// acks, and only the header of our request echoed back. Best effort.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &rtnl{fd: fd}, nil
}

func (c *rtnl) close() { unix.Close(c.fd) }

// nlError is an rtnetlink error with the kernel's extended ack message.
type nlError struct {
	errno syscall.Errno
	msg   string
}

func (e *nlError) Error() string {
	if e.msg == "" {
		return e.errno.Error()
	}
	return e.errno.Error() + ": " + e.msg
}

func (e *nlError) Unwrap() error { return e.errno }

// do sends one request and returns the payloads of the replies: of a dump
// up to NLMSG_DONE; otherwise the request carries NLM_F_ACK and do returns
// at the ack, or its error.
func (c *rtnl) do(typ, flags uint16, body []byte) ([][]byte, error) {
	c.seq++
	dump := flags&unix.NLM_F_DUMP == unix.NLM_F_DUMP
	if !dump {
		flags |= unix.NLM_F_ACK
	}
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(msg[8:], c.seq)
	msg = append(msg, body...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out [][]byte
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != c.seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				// A dump that failed part way ends with DONE carrying the error.
				if len(m.Data) >= 4 {
					if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
						return nil, &nlError{errno: syscall.Errno(-e)}
					}
				}
				return out, nil
			case unix.NLMSG_ERROR:
				if err := ackError(m); err != nil {
					return nil, err
				}
				return out, nil
			}
			// buf is reused by the next receive: keep a copy.
			out = append(out, slices.Clone(m.Data))
			if !dump {
				return out, nil
			}
		}
	}
}

// ackError decodes an NLMSG_ERROR message (nil for a plain ack).
func ackError(m syscall.NetlinkMessage) error {
	if len(m.Data) < 4 {
		return &nlError{errno: unix.EPROTO}
	}
	e := int32(binary.NativeEndian.Uint32(m.Data))
	if e == 0 {
		return nil
	}
	ne := &nlError{errno: syscall.Errno(-e)}
	if m.Header.Flags&unix.NLM_F_ACK_TLVS == 0 || len(m.Data) < 4+unix.SizeofNlMsghdr {
		return ne
	}
	off := 4 + unix.SizeofNlMsghdr
	if m.Header.Flags&unix.NLM_F_CAPPED == 0 {
		// The whole request was echoed: skip it.
		off = 4 + int(binary.NativeEndian.Uint32(m.Data[4:]))
	}
	if off <= len(m.Data) {
		for _, a := range rtattr.Parse(m.Data[off:]) {
			if a.Type == unix.NLMSGERR_ATTR_MSG {
				ne.msg = strings.TrimRight(string(a.Value), "\x00")
			}
		}
	}
	return ne
}

func tcMsg(ifindex int, handle, parent, info uint32) []byte {
	b := make([]byte, sizeofTcMsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(int32(ifindex)))
	binary.NativeEndian.PutUint32(b[8:], handle)
	binary.NativeEndian.PutUint32(b[12:], parent)
	binary.NativeEndian.PutUint32(b[16:], info)
	return b
}

// ensureClsact creates the clsact qdisc of ifindex unless one is there.
func (c *rtnl) ensureClsact(ifindex int) error {
	body := append(tcMsg(ifindex, tcHMake(tcHClsact, 0), tcHClsact, 0), rtattr.String(unix.TCA_KIND, "clsact")...)
	_, err := c.do(unix.RTM_NEWQDISC, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body)
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
func (c *rtnl) dumpFilters(ifindex int, parent uint32) ([]tcFilter, error) {
	msgs, err := c.do(unix.RTM_GETTFILTER, unix.NLM_F_DUMP, tcMsg(ifindex, 0, parent, 0))
	if err != nil {
		return nil, err
	}
	var out []tcFilter
	for _, m := range msgs {
		if len(m) < sizeofTcMsg {
			continue
		}
		f := tcFilter{
			ifindex: int(int32(binary.NativeEndian.Uint32(m[4:]))),
			handle:  binary.NativeEndian.Uint32(m[8:]),
			parent:  binary.NativeEndian.Uint32(m[12:]),
			info:    binary.NativeEndian.Uint32(m[16:]),
		}
		if f.handle == 0 {
			// The classifier itself (one message per priority), no filter.
			continue
		}
		for _, a := range rtattr.Parse(m[sizeofTcMsg:]) {
			switch a.Type {
			case unix.TCA_KIND:
				f.kind = strings.TrimRight(string(a.Value), "\x00")
			case unix.TCA_CHAIN:
				if len(a.Value) >= 4 {
					f.chain = binary.NativeEndian.Uint32(a.Value)
				}
			case unix.TCA_OPTIONS:
				for _, o := range rtattr.Parse(a.Value) {
					switch o.Type {
					case tcaBPFName:
						f.name = strings.TrimRight(string(o.Value), "\x00")
					case tcaBPFID:
						if len(o.Value) >= 4 {
							f.progID = binary.NativeEndian.Uint32(o.Value)
						}
					}
				}
			}
		}
		out = append(out, f)
	}
	return out, nil
}

// setBPFFilter adds, or replaces in place, the direct-action cls_bpf filter
// at (prio, handle) on one hook of ifindex.
func (c *rtnl) setBPFFilter(ifindex int, parent uint32, prio uint16, handle uint32, prog *ebpf.Program, name string) error {
	opts := slices.Concat(
		rtattr.U32(tcaBPFFD, uint32(prog.FD())),
		rtattr.String(tcaBPFName, name),
		rtattr.U32(tcaBPFFlags, tcaBPFFlagActDirect),
	)
	body := slices.Concat(
		tcMsg(ifindex, handle, parent, uint32(prio)<<16|uint32(ethPAll)),
		rtattr.String(unix.TCA_KIND, "bpf"),
		rtattr.Bytes(unix.TCA_OPTIONS|unix.NLA_F_NESTED, opts),
	)
	// NLM_F_CREATE without NLM_F_EXCL: create, or replace the filter that
	// has this handle (tc filter replace).
	_, err := c.do(unix.RTM_NEWTFILTER, unix.NLM_F_CREATE, body)
	return err
}

// delFilter deletes exactly f (its priority, protocol, handle and chain):
// never the whole classifier of a priority other filters may share.
func (c *rtnl) delFilter(f tcFilter) error {
	body := slices.Concat(tcMsg(f.ifindex, f.handle, f.parent, f.info), rtattr.String(unix.TCA_KIND, f.kind))
	if f.chain != 0 {
		body = append(body, rtattr.U32(unix.TCA_CHAIN, f.chain)...)
	}
	_, err := c.do(unix.RTM_DELTFILTER, 0, body)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
		return nil // gone meanwhile
	}
	return err
}

// attachClsact puts progs (in hooks order) on ifindex's clsact hooks,
// replacing our previous filters in place, and removes any other filter of
// ours there (another priority or handle: another version's).
func attachClsact(ifindex int, progs [2]*ebpf.Program) error {
	c, err := openRtnl()
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.ensureClsact(ifindex); err != nil {
		return err
	}
	for i, parent := range clsactParents {
		h := hooks[i]
		fs, err := c.dumpFilters(ifindex, parent)
		if err != nil {
			return fmt.Errorf("list %s filters of ifindex %d: %w", h.clsactDir, ifindex, err)
		}
		for _, f := range fs {
			if f.inOurSlot() && !f.ours() {
				return fmt.Errorf("attach %s to ifindex %d clsact %s: priority %d handle %#x holds a foreign %s filter %q",
					h.suffix, ifindex, h.clsactDir, ClsactPriority, ClsactHandle, f.kind, f.name)
			}
		}
		if err := c.setBPFFilter(ifindex, parent, ClsactPriority, ClsactHandle, progs[i], h.prog); err != nil {
			return fmt.Errorf("attach %s to ifindex %d clsact %s: %w", h.suffix, ifindex, h.clsactDir, err)
		}
		for _, f := range fs {
			if f.ours() && !f.inOurSlot() {
				if err := c.delFilter(f); err != nil {
					return fmt.Errorf("delete stray filter %q (prio %d handle %#x) on ifindex %d: %w", f.name, f.prio(), f.handle, ifindex, err)
				}
			}
		}
	}
	return nil
}

// detachClsact removes our filters from both clsact hooks of ifindex. A
// vanished interface or a missing qdisc is not an error.
func (c *rtnl) detachClsact(ifindex int) error {
	var errs []error
	for _, parent := range clsactParents {
		fs, err := c.dumpFilters(ifindex, parent)
		if errors.Is(err, unix.ENODEV) {
			return nil
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("list filters of ifindex %d: %w", ifindex, err))
			continue
		}
		for _, f := range fs {
			if f.ours() {
				if err := c.delFilter(f); err != nil {
					errs = append(errs, fmt.Errorf("delete filter %q on ifindex %d: %w", f.name, ifindex, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

func detachClsact(ifindex int) error {
	c, err := openRtnl()
	if err != nil {
		return err
	}
	defer c.close()
	return c.detachClsact(ifindex)
}

// detachAllClsact removes our filters from every clsact qdisc in the
// caller's network namespace (filters are not pinned: a fresh process finds
// them by name).
func detachAllClsact() error {
	c, err := openRtnl()
	if err != nil {
		return err
	}
	defer c.close()
	ifs, err := c.clsactInterfaces()
	if err != nil {
		return err
	}
	var errs []error
	for _, ifindex := range ifs {
		if err := c.detachClsact(ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// clsactInterfaces lists the interfaces that have a clsact qdisc (one dump
// of all qdiscs instead of two filter dumps per interface).
func (c *rtnl) clsactInterfaces() ([]int, error) {
	msgs, err := c.do(unix.RTM_GETQDISC, unix.NLM_F_DUMP, tcMsg(0, 0, 0, 0))
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	var out []int
	for _, m := range msgs {
		if len(m) < sizeofTcMsg {
			continue
		}
		for _, a := range rtattr.Parse(m[sizeofTcMsg:]) {
			if a.Type == unix.TCA_KIND && strings.TrimRight(string(a.Value), "\x00") == "clsact" {
				out = append(out, int(int32(binary.NativeEndian.Uint32(m[4:]))))
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// DetachClsactFilters removes every filter of ours (kebpf_np_*) from the
// clsact qdiscs of the caller's network namespace, for `kebpf-agent
// cleanup`, which has no Objects and no pins naming them.
func DetachClsactFilters() error { return detachAllClsact() }
