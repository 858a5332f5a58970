//go:build linux

package sockmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Slots of kebpf_l7_stats; keep in sync with the STAT_* enum in sockmap.c.
const (
	statSteered = iota
	statEnvoySkip
	statNoEnvoy
	statOrigDst
	statOrigDstMiss
	statSockAdd
	statRedirect
	statRedirectMiss
	statClosed
	statMax
)

// Stats are the datapath counters, summed over CPUs since the maps were
// created.
type Stats struct {
	Steered      uint64 // connects rewritten to Envoy
	EnvoySkipped uint64 // Envoy's own connects to a steered destination, left alone
	NoEnvoy      uint64 // connects refused because no Envoy is configured (fail closed)
	OrigDst      uint64 // SO_ORIGINAL_DST answers
	OrigDstMiss  uint64 // SO_ORIGINAL_DST asked for a socket we did not steer
	SockAdded    uint64 // sockets put in the SOCKHASH
	Redirected   uint64 // sk_msg redirects to the peer socket
	RedirectMiss uint64 // sk_msg found no peer (payload took the TCP stack)
	Closed       uint64 // original-destination entries dropped at close
}

// Stats reads the counters.
func (o *Objects) Stats() (Stats, error) {
	var s [statMax]uint64
	for slot := range uint32(statMax) {
		var perCPU []uint64
		if err := o.objs.KebpfL7Stats.Lookup(slot, &perCPU); err != nil {
			return Stats{}, fmt.Errorf("lookup %s[%d]: %w", SockmapMapKebpfL7Stats, slot, err)
		}
		for _, v := range perCPU {
			s[slot] += v
		}
	}
	return Stats{
		Steered: s[statSteered], EnvoySkipped: s[statEnvoySkip], NoEnvoy: s[statNoEnvoy],
		OrigDst: s[statOrigDst], OrigDstMiss: s[statOrigDstMiss], SockAdded: s[statSockAdd],
		Redirected: s[statRedirect], RedirectMiss: s[statRedirectMiss], Closed: s[statClosed],
	}, nil
}

// dstSteer is DST_STEER of sockmap.c.
const dstSteer = 1

// be16 converts a host port to the uint16 whose in-memory (little endian)
// bytes are the port in network order, as __be16 fields hold it.
func be16(p uint16) uint16 { return bits.ReverseBytes16(p) }

// be32 lays out an IPv4 address as the kernel's __be32.
func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.LittleEndian.Uint32(b[:])
}

func addr4(w uint32) netip.Addr {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], w)
	return netip.AddrFrom4(b)
}

func dstKey(ap netip.AddrPort) (SockmapDst4, error) {
	a := ap.Addr().Unmap()
	if !a.Is4() {
		return SockmapDst4{}, fmt.Errorf("steered destination %s: only IPv4 is supported", ap)
	}
	return SockmapDst4{Addr: be32(a), Port: be16(ap.Port())}, nil
}

// SetSteered makes connects to dst (a pod IP:port) go to Envoy.
func (o *Objects) SetSteered(dst netip.AddrPort) error {
	k, err := dstKey(dst)
	if err != nil {
		return err
	}
	if err := o.objs.KebpfL7Dst.Update(&k, uint32(dstSteer), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set steered %s: %w", dst, err)
	}
	return nil
}

// DeleteSteered stops steering dst; a missing entry is not an error.
func (o *Objects) DeleteSteered(dst netip.AddrPort) error {
	k, err := dstKey(dst)
	if err != nil {
		return err
	}
	if err := o.objs.KebpfL7Dst.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete steered %s: %w", dst, err)
	}
	return nil
}

// Steered lists the steered destinations.
func (o *Objects) Steered() ([]netip.AddrPort, error) {
	var (
		k   SockmapDst4
		v   uint32
		out []netip.AddrPort
	)
	it := o.objs.KebpfL7Dst.Iterate()
	for it.Next(&k, &v) {
		out = append(out, netip.AddrPortFrom(addr4(k.Addr), be16(k.Port)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", SockmapMapKebpfL7Dst, err)
	}
	return out, nil
}

// Envoy is where the node-local Envoy listens and how its sockets are
// recognised (they are never steered).
type Envoy struct {
	// Listener is the IPv4 address:port of Envoy's original_dst listener.
	// The zero value means no Envoy: connects to steered destinations fail
	// with EPERM (fail closed).
	Listener netip.AddrPort
	// Mark, when not 0, exempts sockets whose SO_MARK has all these bits.
	Mark uint32
}

// SetEnvoy writes the Envoy listener and mark.
func (o *Objects) SetEnvoy(e Envoy) error {
	var c SockmapCfg
	if e.Listener.IsValid() {
		a := e.Listener.Addr().Unmap()
		if !a.Is4() {
			return fmt.Errorf("envoy listener %s: only IPv4 is supported", e.Listener)
		}
		c.EnvoyAddr, c.EnvoyPort = be32(a), be16(e.Listener.Port())
	}
	c.EnvoyMark = e.Mark
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.objs.KebpfL7Cfg.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set envoy: %w", err)
	}
	return nil
}

// AddEnvoyCgroup exempts the sockets created in the cgroup v2 with id
// (the inode number of its directory) from steering: Envoy's own upstream
// connections must reach the pod, not Envoy again.
func (o *Objects) AddEnvoyCgroup(id uint64) error {
	if err := o.objs.KebpfL7Envcg.Update(id, uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("add envoy cgroup %d: %w", id, err)
	}
	return nil
}

// DeleteEnvoyCgroup removes id; a missing entry is not an error.
func (o *Objects) DeleteEnvoyCgroup(id uint64) error {
	if err := o.objs.KebpfL7Envcg.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete envoy cgroup %d: %w", id, err)
	}
	return nil
}

// Pair is one socket in the SOCKHASH, seen from its own side.
type Pair struct {
	Local, Remote netip.AddrPort
}

// Sockets lists the sockets in the SOCKHASH by their own {local, remote}.
func (o *Objects) Sockets() ([]Pair, error) {
	var (
		k   SockmapTuple4
		v   uint64
		out []Pair
	)
	it := o.objs.KebpfL7Socks.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Pair{
			Local:  netip.AddrPortFrom(addr4(k.LocalAddr), uint16(k.LocalPort)),
			Remote: netip.AddrPortFrom(addr4(k.RemoteAddr), uint16(k.RemotePort)),
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", SockmapMapKebpfL7Socks, err)
	}
	return out, nil
}

// OrigDst is the original destination recorded for Envoy's accepted socket
// {local envoy, remote client}, as getsockopt answers it.
func (o *Objects) OrigDst(envoyEnd Pair) (netip.AddrPort, bool, error) {
	k := SockmapTuple4{
		LocalAddr: be32(envoyEnd.Local.Addr().Unmap()), RemoteAddr: be32(envoyEnd.Remote.Addr().Unmap()),
		LocalPort: uint32(envoyEnd.Local.Port()), RemotePort: uint32(envoyEnd.Remote.Port()),
	}
	var d SockmapDst4
	err := o.objs.KebpfL7Orig.Lookup(&k, &d)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return netip.AddrPort{}, false, nil
	}
	if err != nil {
		return netip.AddrPort{}, false, fmt.Errorf("lookup %s: %w", SockmapMapKebpfL7Orig, err)
	}
	return netip.AddrPortFrom(addr4(d.Addr), be16(d.Port)), true, nil
}
