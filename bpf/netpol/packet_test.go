//go:build linux

package netpol

import (
	"encoding/binary"
	"net/netip"
)

// Hand-written frames for BPF_PROG_TEST_RUN: gopacket is not a dependency
// and the programs never check checksums, so bytes are all we need.

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// pkt describes one Ethernet frame.
type pkt struct {
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16
	flags        uint8 // TCP flags
	icmpType     uint8
	icmpID       uint16
	// IPv4: options (padded to 4 bytes by the caller), fragment offset in
	// 8-byte units, more-fragments flag.
	opts    []byte
	fragOff uint16
	mf      bool
	// IPv6: extension headers to chain before L4 (0, 43, 60, 51, 44).
	ext []uint8
	// inner is the payload (ICMP errors embed the offending packet's IP
	// header and first 8 bytes).
	inner []byte
	// etherType overrides the frame type (ARP, VLAN).
	etherType uint16
	// cut truncates the frame to this many bytes (0: keep).
	cut int
	// mangle edits the IP header after building (malformed headers).
	mangle func(ip []byte)
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func tcpPkt(src, dst string, sport, dport uint16, flags uint8) pkt {
	return pkt{src: addr(src), dst: addr(dst), proto: 6, sport: sport, dport: dport, flags: flags}
}

func udpPkt(src, dst string, sport, dport uint16) pkt {
	return pkt{src: addr(src), dst: addr(dst), proto: 17, sport: sport, dport: dport}
}

func sctpPkt(src, dst string, sport, dport uint16) pkt {
	return pkt{src: addr(src), dst: addr(dst), proto: 132, sport: sport, dport: dport}
}

func icmpPkt(src, dst string, typ uint8, id uint16) pkt {
	p := pkt{src: addr(src), dst: addr(dst), icmpType: typ, icmpID: id, proto: 1}
	if p.src.Is6() {
		p.proto = 58
	}
	return p
}

// reply swaps the endpoints of a TCP/UDP/SCTP packet.
func (p pkt) reply(flags uint8) pkt {
	p.src, p.dst = p.dst, p.src
	p.sport, p.dport = p.dport, p.sport
	p.flags = flags
	return p
}

func (p pkt) l4() []byte {
	var b []byte
	switch p.proto {
	case 6:
		b = make([]byte, 20)
		binary.BigEndian.PutUint16(b[0:], p.sport)
		binary.BigEndian.PutUint16(b[2:], p.dport)
		binary.BigEndian.PutUint32(b[4:], 1000)
		b[12] = 5 << 4
		b[13] = p.flags
		binary.BigEndian.PutUint16(b[14:], 65535)
	case 17:
		b = make([]byte, 8)
		binary.BigEndian.PutUint16(b[0:], p.sport)
		binary.BigEndian.PutUint16(b[2:], p.dport)
		binary.BigEndian.PutUint16(b[4:], 8+uint16(len(p.inner)))
	case 132:
		// Common header + an INIT chunk header.
		b = make([]byte, 16)
		binary.BigEndian.PutUint16(b[0:], p.sport)
		binary.BigEndian.PutUint16(b[2:], p.dport)
		b[12] = 1
		binary.BigEndian.PutUint16(b[14:], 4)
	case 1, 58:
		b = make([]byte, 8)
		b[0] = p.icmpType
		binary.BigEndian.PutUint16(b[4:], p.icmpID)
		binary.BigEndian.PutUint16(b[6:], 1)
	}
	return append(b, p.inner...)
}

// ip returns the IP header(s) and payload, without Ethernet.
func (p pkt) ip() []byte {
	l4 := p.l4()
	if p.src.Is4() {
		h := make([]byte, 20+len(p.opts))
		h[0] = 0x40 | uint8(len(h)/4)
		binary.BigEndian.PutUint16(h[2:], uint16(len(h)+len(l4)))
		frag := p.fragOff & 0x1fff
		if p.mf {
			frag |= 0x2000
		}
		binary.BigEndian.PutUint16(h[6:], frag)
		h[8] = 64
		h[9] = p.proto
		s, d := p.src.As4(), p.dst.As4()
		copy(h[12:], s[:])
		copy(h[16:], d[:])
		copy(h[20:], p.opts)
		if p.fragOff != 0 {
			// A non-first fragment carries payload bytes, not an L4 header.
			l4 = make([]byte, 16)
		}
		if p.mangle != nil {
			p.mangle(h)
		}
		return append(h, l4...)
	}
	var ext []byte
	next := p.proto
	for i := len(p.ext) - 1; i >= 0; i-- {
		var e []byte
		switch p.ext[i] {
		case 44:
			e = make([]byte, 8)
			binary.BigEndian.PutUint16(e[2:], p.fragOff<<3|boolBit(p.mf))
		case 51:
			e = make([]byte, 12) // (len 1 + 2) * 4
			e[1] = 1
		default:
			e = make([]byte, 8) // (len 0 + 1) * 8, PadN filled with zeros
		}
		e[0] = next
		next = p.ext[i]
		ext = append(e, ext...)
	}
	if p.fragOff != 0 {
		l4 = make([]byte, 16)
	}
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(ext)+len(l4)))
	h[6] = next
	h[7] = 64
	s, d := p.src.As16(), p.dst.As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	if p.mangle != nil {
		p.mangle(h)
	}
	return append(append(h, ext...), l4...)
}

func boolBit(b bool) uint16 {
	if b {
		return 1
	}
	return 0
}

// frame returns the Ethernet frame.
func (p pkt) frame() []byte {
	eth := []byte{0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0, 0}
	typ := p.etherType
	var body []byte
	switch {
	case typ != 0:
		// ARP request or an opaque tagged frame: 28 bytes are enough.
		body = make([]byte, 28)
		if p.src.IsValid() {
			body = p.ip()
		}
	case p.src.Is4():
		typ = 0x0800
		body = p.ip()
	default:
		typ = 0x86dd
		body = p.ip()
	}
	binary.BigEndian.PutUint16(eth[12:], typ)
	f := append(eth, body...)
	if p.cut > 0 && p.cut < len(f) {
		f = f[:p.cut]
	}
	return f
}

// icmpErr builds an ICMP error from errSrc about the packet orig (which it
// embeds: IP header + 8 bytes).
func icmpErr(errSrc string, orig pkt) pkt {
	inner := orig.ip()
	hl := 40
	if orig.src.Is4() {
		hl = 20
	}
	inner = inner[:hl+8]
	typ := uint8(3) // destination unreachable
	proto := uint8(1)
	if orig.src.Is6() {
		typ, proto = 1, 58
	}
	return pkt{src: addr(errSrc), dst: orig.src, proto: proto, icmpType: typ, inner: inner}
}
