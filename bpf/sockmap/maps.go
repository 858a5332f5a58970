//go:build linux

package sockmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
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
	s, err := pins.SumPerCPU(o.objs.KebpfL7Stats, SockmapMapKebpfL7Stats, statMax)
	if err != nil {
		return Stats{}, err
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

// Families of dst and tuple keys (FAM4, FAM6 in sockmap.c).
const (
	fam4 = 4
	fam6 = 6
)

// words lays out a as the kernel's __be32[4]: IPv4 in word 0.
func words(a netip.Addr) (w [4]uint32, fam uint16) {
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		w[0] = binary.LittleEndian.Uint32(b[:])
		return w, fam4
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return w, fam6
}

func fromWords(w [4]uint32, fam uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.LittleEndian.PutUint32(b[4*i:], w[i])
	}
	if fam == fam4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func dstKey(ap netip.AddrPort) (SockmapL7Dst, error) {
	if !ap.IsValid() {
		return SockmapL7Dst{}, fmt.Errorf("steered destination %s: invalid", ap)
	}
	w, fam := words(ap.Addr())
	return SockmapL7Dst{Addr: w, Port: be16(ap.Port()), Family: fam}, nil
}

func tupleKey(p Pair) SockmapL7Tuple {
	l, fam := words(p.Local.Addr())
	r, _ := words(p.Remote.Addr())
	return SockmapL7Tuple{Local: l, Remote: r, LocalPort: uint32(p.Local.Port()), RemotePort: uint32(p.Remote.Port()), Family: uint32(fam)}
}

// SetSteered makes connects to dst (a pod IP:port) go to Envoy.
func (o *Objects) SetSteered(dst netip.AddrPort) error {
	k, err := dstKey(dst)
	if err != nil {
		return err
	}
	// bpf/netpol checks every pod's SYNs from here on (it must, before
	// the first connect is steered).
	if err := o.setActive(); err != nil {
		return err
	}
	if err := o.objs.KebpfL7Dst.Update(&k, uint32(dstSteer), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set steered %s: %w", dst, err)
	}
	return nil
}

// setActive sets kebpf_l7_active, the shared "steering may be in use"
// flag; Detach and DetachPinned clear it after emptying kebpf_l7_dst.
func (o *Objects) setActive() error {
	if err := o.objs.KebpfL7Active.Update(uint32(0), uint32(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set %s: %w", SockmapMapKebpfL7Active, err)
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
		k   SockmapL7Dst
		v   uint32
		out []netip.AddrPort
	)
	it := o.objs.KebpfL7Dst.Iterate()
	for it.Next(&k, &v) {
		out = append(out, netip.AddrPortFrom(fromWords(k.Addr, uint32(k.Family)), be16(k.Port)))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", SockmapMapKebpfL7Dst, err)
	}
	return out, nil
}

// Envoy is where the node-local Envoy listens and how its sockets are
// recognised (they are never steered).
type Envoy struct {
	// Listener is the IPv4 address:port of Envoy's original_dst listener,
	// for IPv4 destinations (and v4-mapped ones of dual-stack sockets).
	// The zero value means no Envoy: connects to steered IPv4 destinations
	// fail with EPERM (fail closed).
	Listener netip.AddrPort
	// Listener6 is the IPv6 listener for IPv6 destinations; zero: they
	// fail closed likewise.
	Listener6 netip.AddrPort
	// Mark, when not 0, exempts sockets whose SO_MARK has all these bits.
	Mark uint32
}

// SetEnvoy writes the Envoy listener and mark.
func (o *Objects) SetEnvoy(e Envoy) error {
	var c SockmapCfg
	if e.Listener.IsValid() {
		w, fam := words(e.Listener.Addr())
		if fam != fam4 {
			return fmt.Errorf("envoy listener %s: want IPv4 (Listener6 takes IPv6)", e.Listener)
		}
		c.Envoy4, c.EnvoyPort4 = w[0], be16(e.Listener.Port())
	}
	if e.Listener6.IsValid() {
		w, fam := words(e.Listener6.Addr())
		if fam != fam6 {
			return fmt.Errorf("envoy listener6 %s: want IPv6", e.Listener6)
		}
		c.Envoy6, c.EnvoyPort6 = w, be16(e.Listener6.Port())
	}
	c.EnvoyMark = e.Mark
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.objs.KebpfL7Cfg.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set envoy: %w", err)
	}
	return nil
}

// AddEnvoyCgroup exempts from steering the connects made by processes in
// the cgroup v2 with id (the inode number of its directory) or in any cgroup
// below it (up to level 12 of the hierarchy): Envoy's own upstream
// connections must reach the pod, not Envoy again. Register the Envoy
// *pod's* cgroup (e.g. .../kubepods-burstable-pod<uid>.slice), which stays
// the same across container restarts; a restarted container gets a new
// child cgroup. bpf/netpol lets only such sockets open connections to a
// steered pod:port.
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
		k   SockmapL7Tuple
		v   uint64
		out []Pair
	)
	it := o.objs.KebpfL7Socks.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Pair{
			Local:  netip.AddrPortFrom(fromWords(k.Local, k.Family), uint16(k.LocalPort)),
			Remote: netip.AddrPortFrom(fromWords(k.Remote, k.Family), uint16(k.RemotePort)),
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
	k := tupleKey(envoyEnd)
	var d SockmapL7Dst
	err := o.objs.KebpfL7Orig.Lookup(&k, &d)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return netip.AddrPort{}, false, nil
	}
	if err != nil {
		return netip.AddrPort{}, false, fmt.Errorf("lookup %s: %w", SockmapMapKebpfL7Orig, err)
	}
	return netip.AddrPortFrom(fromWords(d.Addr, uint32(d.Family)), be16(d.Port)), true, nil
}
