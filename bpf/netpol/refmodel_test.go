//go:build linux

package netpol

import (
	"encoding/binary"
	"net/netip"
)

// A reference datapath in plain Go for the fuzz targets: the parser, the
// conntrack and the policy lookup written again from the package README
// ("Decisions", "Parser", "Fragments", "Protocols") over raw frame bytes and
// the EndpointPolicy a test applied, without reading any map. The fuzz
// targets run the real programs and this model side by side on the same
// frames; every difference is a failure, so a parser or verdict bug in
// netpol.c (or in what ApplyEndpoint writes) shows up as a disagreement.
//
// Left out on purpose, because a fuzz iteration cannot reach them: conntrack
// timeouts (microseconds between packets), policy revisions (no apply while
// fuzzing) and L7 steering (no sockmap: kebpf_l7_active is 0 and the
// kebpf_l7_* maps are empty, so the SYN checks always say "not ours").

type refRes int

const (
	refOK   refRes = iota // judged by conntrack and policy
	refPass               // not for policy: non-IP, NDP/MLD, non-first fragment
	refDrop               // IP claimed but malformed or truncated
)

func (r refRes) String() string {
	return [...]string{"ok", "pass", "drop"}[r]
}

// refPkt is what the reference parser makes of a frame.
type refPkt struct {
	res      refRes
	why      string // for refPass/refDrop: which rule decided, for failure messages
	v6       bool
	src, dst netip.Addr // v6 addresses stay 16-byte, mapped ones included
	proto    uint8
	// sport/dport: TCP/UDP/SCTP ports; ICMP echo and other non-errors: the
	// id in both; 0 otherwise.
	sport, dport uint16
	hasPorts     bool
	tcpFlags     uint8
	icmpErr      bool
	// Inner tuple of an ICMP error, when its header could be read.
	innerOK        bool
	iproto         uint8
	isrc, idst     netip.Addr
	isport, idport uint16
}

// runRefused: BPF_PROG_TEST_RUN on this kernel refuses a frame shorter than
// an Ethernet header, and one whose ethertype claims IPv4/IPv6 but that is
// shorter than the fixed IP header (EINVAL, before the program runs).
func runRefused(f []byte) bool {
	if len(f) < 14 {
		return true
	}
	switch binary.BigEndian.Uint16(f[12:]) {
	case 0x0800:
		return len(f) < 14+20
	case 0x86dd:
		return len(f) < 14+40
	}
	return false
}

// has: bytes [off, off+n) are inside the frame (bpf_skb_load_bytes succeeds).
func has(f []byte, off, n uint64) bool { return off+n <= uint64(len(f)) }

func refParse(f []byte) refPkt {
	drop := func(why string) refPkt { return refPkt{res: refDrop, why: why} }
	if len(f) < 14 {
		return refPkt{res: refPass, why: "no ethernet header"}
	}
	var p refPkt
	var off, limit uint64
	switch binary.BigEndian.Uint16(f[12:]) {
	case 0x0800:
		if !has(f, 14, 20) {
			return drop("ipv4 header cut")
		}
		h := f[14:]
		ihl := uint64(h[0]&0xf) * 4
		if h[0]>>4 != 4 || ihl < 20 {
			return drop("ipv4 version or ihl")
		}
		tot := uint64(binary.BigEndian.Uint16(h[2:]))
		if tot != 0 && tot < ihl {
			return drop("ipv4 tot_len < ihl")
		}
		if !has(f, 14, ihl) {
			return drop("ipv4 options cut")
		}
		p.proto = h[9]
		p.src = netip.AddrFrom4([4]byte(h[12:16]))
		p.dst = netip.AddrFrom4([4]byte(h[16:20]))
		if binary.BigEndian.Uint16(h[6:])&0x1fff != 0 {
			return refPkt{res: refPass, why: "ipv4 non-first fragment"}
		}
		off = 14 + ihl
		if tot != 0 {
			limit = 14 + tot
		}
	case 0x86dd:
		if !has(f, 14, 40) {
			return drop("ipv6 header cut")
		}
		h := f[14:]
		if h[0]>>4 != 6 {
			return drop("ipv6 version")
		}
		p.v6 = true
		p.src = netip.AddrFrom16([16]byte(h[8:24]))
		p.dst = netip.AddrFrom16([16]byte(h[24:40]))
		off = 14 + 40
		if pl := uint64(binary.BigEndian.Uint16(h[4:])); pl != 0 {
			limit = off + pl
		}
		nh := h[6]
		for range 6 { // MAX_V6_EXT
			switch nh {
			case 0, 43, 60:
				if !has(f, off, 2) {
					return drop("ipv6 extension header cut")
				}
				nh, off = f[off], off+(uint64(f[off+1])+1)*8
				continue
			case 51:
				if !has(f, off, 2) {
					return drop("ipv6 AH cut")
				}
				nh, off = f[off], off+(uint64(f[off+1])+2)*4
				continue
			case 44:
				if !has(f, off, 8) {
					return drop("ipv6 fragment header cut")
				}
				fo := binary.BigEndian.Uint16(f[off+2:]) & 0xfff8
				nh, off = f[off], off+8
				if fo != 0 {
					return refPkt{res: refPass, why: "ipv6 non-first fragment"}
				}
				continue
			}
			break
		}
		switch nh {
		case 0, 43, 60, 51, 44:
			return drop("more than 6 ipv6 extension headers")
		}
		if limit != 0 && off > limit {
			return drop("ipv6 extension headers beyond payload_len")
		}
		p.proto = nh
	case 0x8100, 0x88a8:
		return drop("vlan tagged")
	default:
		return refPkt{res: refPass, why: "not ip"}
	}

	// L4: the whole minimal header must be in the frame and, when the IP
	// header says how long the payload is, inside it.
	need := func(n uint64) bool { return (limit == 0 || off+n <= limit) && has(f, off, n) }
	switch p.proto {
	case 6, 17, 132:
		n := map[uint8]uint64{6: 20, 17: 8, 132: 12}[p.proto]
		if !need(n) {
			return drop("l4 header cut")
		}
		if p.proto == 6 {
			if f[off+12]>>4 < 5 {
				return drop("tcp data offset < 5")
			}
			p.tcpFlags = f[off+13]
		}
		p.sport = binary.BigEndian.Uint16(f[off:])
		p.dport = binary.BigEndian.Uint16(f[off+2:])
		p.hasPorts = true
	case 1, 58:
		if !need(8) {
			return drop("icmp header cut")
		}
		typ := f[off]
		if p.proto == 58 && p.v6 && ((typ >= 130 && typ <= 137) || typ == 143) {
			return refPkt{res: refPass, why: "ndp/mld"}
		}
		// Error types are told apart by the protocol number alone (netpol.c
		// does not check that ICMP rides on IPv4 and ICMPv6 on IPv6).
		if (p.proto == 1 && (typ == 3 || typ == 11 || typ == 12)) || (p.proto == 58 && typ >= 1 && typ <= 4) {
			p.icmpErr = true
			refInner(f, off+8, p.v6, &p)
			break
		}
		p.sport = binary.BigEndian.Uint16(f[off+4:])
		p.dport = p.sport
	}
	p.res = refOK
	return p
}

// refInner reads the header an ICMP error embeds: the fixed IP header of
// the outer packet's family (no IPv6 extension headers) and the ports or
// echo id after it. Only the frame bounds it, not the outer IP length.
func refInner(f []byte, off uint64, v6 bool, p *refPkt) {
	var l4 uint64
	if !v6 {
		if !has(f, off, 20) || f[off]>>4 != 4 || f[off]&0xf < 5 {
			return
		}
		p.iproto = f[off+9]
		p.isrc = netip.AddrFrom4([4]byte(f[off+12 : off+16]))
		p.idst = netip.AddrFrom4([4]byte(f[off+16 : off+20]))
		l4 = off + uint64(f[off]&0xf)*4
	} else {
		if !has(f, off, 40) || f[off]>>4 != 6 {
			return
		}
		p.iproto = f[off+6]
		p.isrc = netip.AddrFrom16([16]byte(f[off+8 : off+24]))
		p.idst = netip.AddrFrom16([16]byte(f[off+24 : off+40]))
		l4 = off + 40
	}
	switch p.iproto {
	case 6, 17, 132:
		if !has(f, l4, 4) {
			return
		}
		p.isport = binary.BigEndian.Uint16(f[l4:])
		p.idport = binary.BigEndian.Uint16(f[l4+2:])
	case 1, 58:
		if !has(f, l4, 8) {
			return
		}
		p.isport = binary.BigEndian.Uint16(f[l4+4:])
		p.idport = p.isport
	default:
		return
	}
	p.innerOK = true
}

// refEnd is one side of a flow.
type refEnd struct {
	addr netip.Addr
	port uint16
}

// refKey is a flow regardless of direction: the two ends in a fixed order.
type refKey struct {
	v6    bool
	proto uint8
	a, b  refEnd
}

func refKeyOf(v6 bool, proto uint8, s refEnd, d refEnd) refKey {
	if c := s.addr.Compare(d.addr); c > 0 || (c == 0 && s.port > d.port) {
		s, d = d, s
	}
	return refKey{v6: v6, proto: proto, a: s, b: d}
}

type refFlow struct {
	origDir             Direction
	rst, finOrig, finRe bool
}

// refDP is the reference datapath of one endpoint (the one on the test
// interface) with its conntrack.
type refDP struct {
	ep    EndpointPolicy
	hosts []netip.Addr
	ct    map[refKey]*refFlow
}

func newRefDP(ep EndpointPolicy, hosts []netip.Addr) *refDP {
	return &refDP{ep: ep, hosts: hosts, ct: map[refKey]*refFlow{}}
}

func (m *refDP) reset() { clear(m.ct) }

// run is the fate of frame f going dir through the endpoint's program:
// actPass or actDrop, and why (for failure messages).
func (m *refDP) run(dir Direction, f []byte) (int32, string) {
	if !m.ep.IngressEnforced && !m.ep.EgressEnforced {
		return actPass, "endpoint enforced in no direction"
	}
	p := refParse(f)
	switch p.res {
	case refPass:
		return actPass, "parser: " + p.why
	case refDrop:
		return actDrop, "parser: " + p.why
	}
	k := refKeyOf(p.v6, p.proto, refEnd{p.src, p.sport}, refEnd{p.dst, p.dport})
	if fl := m.ct[k]; fl != nil && !p.icmpErr {
		closed := fl.rst || (fl.finOrig && fl.finRe)
		if !(p.proto == 6 && closed && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN) {
			orig := fl.origDir == dir
			if p.tcpFlags&tcpRST != 0 {
				fl.rst = true
			}
			if p.tcpFlags&tcpFIN != 0 {
				if orig {
					fl.finOrig = true
				} else {
					fl.finRe = true
				}
			}
			return actPass, "conntrack"
		}
		delete(m.ct, k) // a SYN on a closed tuple is a new flow
	}
	// Related only when the error goes back to the embedded packet's sender.
	if p.icmpErr && p.innerOK && p.dst == p.isrc {
		if m.ct[refKeyOf(p.v6, p.iproto, refEnd{p.isrc, p.isport}, refEnd{p.idst, p.idport})] != nil {
			return actPass, "icmp error of a tracked flow"
		}
	}
	peer := p.src
	if dir == Egress {
		peer = p.dst
	}
	for _, h := range m.hosts {
		if h == peer {
			return actPass, "node address"
		}
	}
	allow, why := m.policy(dir, peer, p.proto, p.hasPorts, p.dport)
	if !allow {
		return actDrop, why
	}
	if !p.icmpErr && !(p.proto == 6 && p.tcpFlags&tcpRST != 0) {
		m.ct[k] = &refFlow{origDir: dir, finOrig: p.proto == 6 && p.tcpFlags&tcpFIN != 0}
	}
	return actPass, why
}

// policy: the longest prefix of the direction containing peer decides alone;
// its first matching rule allows; nothing: default deny. A v6 packet's
// address (mapped or not) only meets v6 prefixes.
func (m *refDP) policy(dir Direction, peer netip.Addr, proto uint8, hasPorts bool, dport uint16) (bool, string) {
	enforced, entries := m.ep.IngressEnforced, m.ep.Ingress
	if dir == Egress {
		enforced, entries = m.ep.EgressEnforced, m.ep.Egress
	}
	if !enforced {
		return true, "direction not enforced"
	}
	var best *PeerEntry
	for i, pe := range entries {
		if pe.Prefix.Addr().Is4() != peer.Is4() || !pe.Prefix.Contains(peer) {
			continue
		}
		if best == nil || pe.Prefix.Bits() > best.Prefix.Bits() {
			best = &entries[i]
		}
	}
	if best == nil {
		return false, "no prefix: default deny"
	}
	for _, r := range best.Rules {
		if r.Proto != AnyProto && uint8(r.Proto) != proto {
			continue
		}
		if lo, hi := r.PortLo, r.PortHi; lo != 0 || hi != 0 {
			if hi == 0 {
				hi = lo
			}
			if !hasPorts || dport < lo || dport > hi {
				continue
			}
		}
		return true, "allowed by " + best.Prefix.String()
	}
	return false, "no rule of " + best.Prefix.String() + ": default deny"
}
