//go:build linux

package netpol

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// Interface discovery through github.com/vishvananda/netlink: a handle per
// network namespace (netlink.NewHandleAt), no thread switching here.
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
	// Netns is the path of the node's network namespace, where the pods'
	// host-side interfaces live; "" is the agent's own.
	Netns string
}

// IfIndex returns the host-side interface of the pod with these IPs, 0 and
// no error when none is there (yet).
func (n *NetlinkInterfaces) IfIndex(ips []netip.Addr) (int, error) {
	h, err := handleAt(n.Netns)
	if err != nil {
		return 0, err
	}
	defer h.Close()
	var firstErr error
	for _, ip := range ips {
		idx, err := n.ifIndex(h, ip)
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

// handleAt is a NETLINK_ROUTE handle in the namespace at path ("" = the
// calling thread's).
func handleAt(path string) (*netlink.Handle, error) {
	if path == "" {
		return netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		// The library formats setns's errno into text (%v); keep EPERM
		// recognisable (errors.Is(err, os.ErrPermission)) for the caller.
		if strings.Contains(err.Error(), unix.EPERM.Error()) {
			return nil, fmt.Errorf("netlink handle in %s: %w (%v)", path, unix.EPERM, err)
		}
		return nil, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	return h, nil
}

func (n *NetlinkInterfaces) ifIndex(h *netlink.Handle, ip netip.Addr) (int, error) {
	routes, err := h.RouteGet(ip.AsSlice())
	if err != nil {
		return 0, fmt.Errorf("route to %s: %w", ip, err)
	}
	if len(routes) == 0 {
		return 0, fmt.Errorf("route to %s: no route reply", ip)
	}
	oif := routes[0].LinkIndex
	if routes[0].Type != unix.RTN_UNICAST || oif == 0 {
		return 0, nil // local, unreachable, blackhole: no pod interface
	}
	l, err := linkByIndex(h, oif)
	if err != nil || l == nil {
		return 0, err
	}
	if l.Type() != "bridge" {
		return oif, nil
	}
	return n.bridgePort(h, oif, ip)
}

// linkByIndex is the link ifindex, nil when there is none.
func linkByIndex(h *netlink.Handle, ifindex int) (netlink.Link, error) {
	l, err := h.LinkByIndex(ifindex)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("link %d: %w", ifindex, err)
	}
	return l, nil
}

// bridgePort finds the member of bridge whose veth peer holds ip.
// A namespace it may not enter is an error, not "no port": without
// CAP_SYS_ADMIN (setns) every pod behind a bridge would silently go
// unenforced while the agent reports ready.
func (n *NetlinkInterfaces) bridgePort(h *netlink.Handle, bridge int, ip netip.Addr) (int, error) {
	var denied error
	for _, path := range n.netnsPaths() {
		host, err := peerOfAddrIn(path, ip)
		if errors.Is(err, os.ErrPermission) && denied == nil {
			denied = fmt.Errorf("find the bridge port of %s: %w (the agent needs CAP_SYS_ADMIN to enter pod network namespaces)", ip, err)
		}
		if err != nil || host == 0 {
			continue // namespaces come and go while we scan
		}
		if l, err := linkByIndex(h, host); err == nil && l != nil && l.Attrs().MasterIndex == bridge {
			return host, nil
		}
	}
	return 0, denied
}

func (n *NetlinkInterfaces) netnsPaths() []string {
	dirs := n.NetnsDirs
	if len(dirs) == 0 {
		dirs = []string{netnsutil.Dir, "/var/run/netns"}
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
	h, err := handleAt(path)
	if err != nil {
		return 0, err
	}
	defer h.Close()
	family := netlink.FAMILY_V4
	if ip.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := h.AddrList(nil, family)
	if err != nil {
		return 0, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); !ok || got.Unmap() != ip {
			continue
		}
		l, err := linkByIndex(h, a.LinkIndex)
		if err != nil || l == nil {
			return 0, err
		}
		// NetNsID is IFLA_LINK_NETNSID, -1 without one: the peer is in
		// this same namespace, not the host's.
		if l.Attrs().NetNsID < 0 {
			return 0, nil
		}
		return l.Attrs().ParentIndex, nil
	}
	return 0, nil
}

// Watch calls notify whenever links or routes change on the host, until ctx
// is done. A new pod's veth (RTM_NEWLINK, then the bridge enslaving it or
// its /32 route) shows up here before the kubelet reports the pod's IP.
//
// A bare subscription (nl.SubscribeAt): only the fact that something
// changed matters, so the library's per-kind subscriptions, which decode
// every message onto a channel each, would be more than needed.
func (n *NetlinkInterfaces) Watch(ctx context.Context, notify func()) error {
	ns, cur := netns.None(), netns.None()
	if n.Netns != "" {
		var err error
		if ns, err = netns.GetFromPath(n.Netns); err != nil {
			return fmt.Errorf("open netns %s: %w", n.Netns, err)
		}
		defer ns.Close()
		if cur, err = netns.Get(); err != nil {
			return fmt.Errorf("open own netns: %w", err)
		}
		defer cur.Close()
	}
	s, err := nl.SubscribeAt(ns, cur, unix.NETLINK_ROUTE,
		unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink subscribe: %w", err)
	}
	defer s.Close()
	// A receive timeout lets the loop notice ctx without closing the socket
	// under a blocked read.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	if err := s.SetReceiveTimeout(&tv); err != nil {
		return fmt.Errorf("netlink timeout: %w", err)
	}
	for ctx.Err() == nil {
		_, _, err := s.Receive()
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
