//go:build linux

package netpol

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/rtattr"
)

// Interface discovery with raw rtnetlink (vishvananda/netlink is not a
// dependency of this module).
//
// The host-side interface of a pod is the output interface of the route to
// its IP. That is the pod's own veth for CNIs that route per pod (kindnet:
// ptp veth, a /32 route per pod). For a bridge CNI (the local cluster's
// kebpf0) the route points at the bridge; the pod's port is the bridge
// member veth whose peer holds the pod IP. We find it from the pod side: in
// each network namespace, the interface holding the IP is a veth whose
// IFLA_LINK is its peer's ifindex in the host namespace. That works before
// the pod sent anything, unlike the bridge FDB or the neighbor table, which
// only learn from traffic.

// NetlinkInterfaces finds pod interfaces through rtnetlink.
type NetlinkInterfaces struct {
	// NetnsDirs hold bind-mounted network namespaces (CNI's netns paths);
	// empty means /run/netns and /var/run/netns.
	NetnsDirs []string
	// ScanProc also looks at /proc/*/ns/net (needs hostPID), for runtimes
	// that keep their netns elsewhere.
	ScanProc bool
}

// IfIndex returns the host-side interface of the pod with these IPs, 0 and
// no error when none is there (yet).
func (n *NetlinkInterfaces) IfIndex(ips []netip.Addr) (int, error) {
	var firstErr error
	for _, ip := range ips {
		idx, err := n.ifIndex(ip)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if idx > 0 {
			return idx, nil
		}
	}
	return 0, firstErr
}

func (n *NetlinkInterfaces) ifIndex(ip netip.Addr) (int, error) {
	oif, rtype, err := routeGet(ip)
	if err != nil {
		return 0, fmt.Errorf("route to %s: %w", ip, err)
	}
	if rtype != unix.RTN_UNICAST || oif == 0 {
		return 0, nil // local, unreachable, blackhole: no pod interface
	}
	links, err := dumpLinks(-1)
	if err != nil {
		return 0, err
	}
	l, ok := links[oif]
	if !ok {
		return 0, nil
	}
	if l.kind != "bridge" {
		return oif, nil
	}
	return n.bridgePort(oif, ip, links)
}

// bridgePort finds the member of bridge whose veth peer holds ip.
func (n *NetlinkInterfaces) bridgePort(bridge int, ip netip.Addr, links map[int]link) (int, error) {
	for _, path := range n.netnsPaths() {
		host, err := peerOfAddrIn(path, ip)
		if err != nil || host == 0 {
			continue // namespaces come and go while we scan
		}
		if l, ok := links[host]; ok && l.master == bridge {
			return host, nil
		}
	}
	return 0, nil
}

func (n *NetlinkInterfaces) netnsPaths() []string {
	dirs := n.NetnsDirs
	if len(dirs) == 0 {
		dirs = []string{"/run/netns", "/var/run/netns"}
	}
	seen := map[[2]uint64]bool{}
	var out []string
	add := func(p string) {
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil {
			return
		}
		k := [2]uint64{st.Dev, st.Ino}
		if !seen[k] {
			seen[k] = true
			out = append(out, p)
		}
	}
	// The agent's own namespace is the host one: never a pod's.
	add("/proc/self/ns/net")
	out = out[:0]
	for _, d := range dirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			add(filepath.Join(d, e.Name()))
		}
	}
	if n.ScanProc {
		procs, _ := filepath.Glob("/proc/[0-9]*/ns/net")
		for _, p := range procs {
			add(p)
		}
	}
	return out
}

// peerOfAddrIn returns, for the interface holding ip in the netns at path,
// its IFLA_LINK: for a veth whose peer is in another namespace, the peer's
// ifindex there.
func peerOfAddrIn(path string, ip netip.Addr) (int, error) {
	fd, err := socketIn(path)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	idx, err := addrIndex(fd, ip)
	if err != nil || idx == 0 {
		return 0, err
	}
	links, err := dumpLinksFd(fd, idx)
	if err != nil {
		return 0, err
	}
	l, ok := links[idx]
	if !ok || !l.hasLinkNetns {
		return 0, nil
	}
	return l.link, nil
}

// socketIn opens a NETLINK_ROUTE socket in the netns at path: a socket
// stays in the namespace it was created in, so only its creation needs a
// thread switched over. That happens on a goroutine of its own which stays
// locked to its thread if switching back fails, so the runtime retires the
// thread instead of reusing it in the wrong namespace.
func socketIn(path string) (int, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, restored, err := socketInLocked(path)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}

func socketInLocked(path string) (fd int, restored bool, err error) {
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, err
	}
	defer unix.Close(target)
	self, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, err
	}
	defer unix.Close(self)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		return -1, true, fmt.Errorf("setns %s: %w", path, err)
	}
	fd, sockErr := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
		if sockErr == nil {
			unix.Close(fd)
		}
		return -1, false, fmt.Errorf("setns back: %w", err)
	}
	if sockErr != nil {
		return -1, true, sockErr
	}
	return fd, true, nil
}

func hostSocket() (int, error) {
	return unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
}

// request sends one netlink request and collects the replies until DONE
// (dumps) or the first answer (gets).
func request(fd int, typ uint16, flags uint16, body []byte) ([]syscall.NetlinkMessage, error) {
	const seq = 1
	hdr := make([]byte, unix.SizeofNlMsghdr)
	binary.NativeEndian.PutUint32(hdr[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(hdr[4:], typ)
	binary.NativeEndian.PutUint16(hdr[6:], flags|unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(hdr[8:], seq)
	if err := unix.Sendto(fd, append(hdr, body...), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	dump := flags&unix.NLM_F_DUMP != 0
	var out []syscall.NetlinkMessage
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue // the Go runtime's preemption signal; SO_RCVTIMEO disables the restart
		}
		if err != nil {
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(binary.NativeEndian.Uint32(m.Data)); e != 0 {
						return nil, syscall.Errno(-e)
					}
				}
				return out, nil
			}
			// buf is reused by the next receive: keep a copy.
			m.Data = slices.Clone(m.Data)
			out = append(out, m)
			if !dump {
				return out, nil
			}
		}
	}
}

// routeGet asks the kernel which route it would use to reach ip.
func routeGet(ip netip.Addr) (oif int, rtype uint8, err error) {
	fd, err := hostSocket()
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(fd)
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	body := make([]byte, unix.SizeofRtMsg)
	body[0] = byte(family)
	body[1] = byte(ip.BitLen()) // dst_len
	body = append(body, rtattr.Bytes(unix.RTA_DST, ip.AsSlice())...)
	msgs, err := request(fd, unix.RTM_GETROUTE, 0, body)
	if err != nil {
		return 0, 0, err
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWROUTE || len(m.Data) < unix.SizeofRtMsg {
			continue
		}
		rtype = m.Data[7] // rtm_type
		for _, a := range rtattr.Parse(m.Data[unix.SizeofRtMsg:]) {
			if a.Type == unix.RTA_OIF {
				oif = u32(a.Value)
			}
		}
		return oif, rtype, nil
	}
	return 0, 0, errors.New("no route reply")
}

type link struct {
	name         string
	kind         string
	master       int
	link         int
	hasLinkNetns bool
}

func dumpLinks(only int) (map[int]link, error) {
	fd, err := hostSocket()
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return dumpLinksFd(fd, only)
}

// dumpLinksFd lists links (only one, when only > 0).
func dumpLinksFd(fd int, only int) (map[int]link, error) {
	body := make([]byte, unix.SizeofIfInfomsg)
	body[0] = unix.AF_UNSPEC
	flags := uint16(unix.NLM_F_DUMP)
	if only > 0 {
		binary.NativeEndian.PutUint32(body[4:], uint32(only))
		flags = 0
	}
	msgs, err := request(fd, unix.RTM_GETLINK, flags, body)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := map[int]link{}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWLINK || len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		idx := int(int32(binary.NativeEndian.Uint32(m.Data[4:8])))
		var l link
		for _, a := range rtattr.Parse(m.Data[unix.SizeofIfInfomsg:]) {
			switch a.Type {
			case unix.IFLA_IFNAME:
				l.name = string(trimNul(a.Value))
			case unix.IFLA_MASTER:
				l.master = u32(a.Value)
			case unix.IFLA_LINK:
				l.link = u32(a.Value)
			case unix.IFLA_LINK_NETNSID:
				l.hasLinkNetns = true
			case unix.IFLA_LINKINFO:
				l.kind = linkKind(a.Value)
			}
		}
		out[idx] = l
	}
	return out, nil
}

func u32(b []byte) int {
	if len(b) < 4 {
		return 0
	}
	return int(binary.NativeEndian.Uint32(b))
}

func linkKind(nested []byte) string {
	for _, a := range rtattr.Parse(nested) {
		if a.Type == unix.IFLA_INFO_KIND {
			return string(trimNul(a.Value))
		}
	}
	return ""
}

func trimNul(b []byte) []byte {
	for len(b) > 0 && b[len(b)-1] == 0 {
		b = b[:len(b)-1]
	}
	return b
}

// addrIndex returns the interface holding ip in fd's namespace.
func addrIndex(fd int, ip netip.Addr) (int, error) {
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	body := make([]byte, unix.SizeofIfAddrmsg)
	body[0] = byte(family)
	msgs, err := request(fd, unix.RTM_GETADDR, unix.NLM_F_DUMP, body)
	if err != nil {
		return 0, fmt.Errorf("list addresses: %w", err)
	}
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_NEWADDR || len(m.Data) < unix.SizeofIfAddrmsg {
			continue
		}
		idx := int(binary.NativeEndian.Uint32(m.Data[4:8]))
		for _, a := range rtattr.Parse(m.Data[unix.SizeofIfAddrmsg:]) {
			if a.Type != unix.IFA_LOCAL && a.Type != unix.IFA_ADDRESS {
				continue
			}
			if got, ok := netip.AddrFromSlice(a.Value); ok && got.Unmap() == ip {
				return idx, nil
			}
		}
	}
	return 0, nil
}

// Watch calls notify whenever links or routes change on the host, until ctx
// is done. A new pod's veth (RTM_NEWLINK, then the bridge enslaving it or
// its /32 route) shows up here before the kubelet reports the pod's IP.
func (n *NetlinkInterfaces) Watch(ctx context.Context, notify func()) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink socket: %w", err)
	}
	defer unix.Close(fd)
	groups := uint32(unix.RTMGRP_LINK | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		return fmt.Errorf("netlink subscribe: %w", err)
	}
	// A receive timeout lets the loop notice ctx without closing the fd
	// under a blocked read.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("netlink timeout: %w", err)
	}
	buf := make([]byte, 1<<16)
	for ctx.Err() == nil {
		_, _, err := unix.Recvfrom(fd, buf, 0)
		switch {
		case err == nil:
			notify()
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.ENOBUFS):
			notify() // events were lost: look at everything again
		default:
			return fmt.Errorf("netlink receive: %w", err)
		}
	}
	return nil
}

func defaultInterfaces() Interfaces { return &NetlinkInterfaces{ScanProc: true} }
