//go:build linux

// Package rtattr encodes and parses rtnetlink attributes (struct rtattr),
// for the raw rtnetlink code of the policy datapath's clsact attach and the
// agent's pod interface discovery (this module does not depend on a netlink
// library; see nodeagent/netpol/iface_linux.go for why raw).
package rtattr

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// Attr is one attribute; Value aliases the message it was parsed from.
type Attr struct {
	Type  uint16 // NLA_F_NESTED cleared
	Value []byte
}

// Parse reads attributes up to the first malformed one. The syscall
// package's parser rejects a whole message for one attribute it does not
// like (bridges carry plenty), which would hide the link or filter.
func Parse(b []byte) []Attr {
	var out []Attr
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) &^ unix.NLA_F_NESTED
		if l < unix.SizeofRtAttr || l > len(b) {
			break
		}
		out = append(out, Attr{typ, b[unix.SizeofRtAttr:l]})
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
	return out
}

// Bytes encodes one attribute, padded to RTA_ALIGNTO.
func Bytes(typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b := make([]byte, (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1))
	binary.NativeEndian.PutUint16(b[0:], uint16(l))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[unix.SizeofRtAttr:], data)
	return b
}

// U32 encodes a native-endian u32 attribute.
func U32(typ uint16, v uint32) []byte { return Bytes(typ, binary.NativeEndian.AppendUint32(nil, v)) }

// String encodes a NUL-terminated string attribute.
func String(typ uint16, s string) []byte { return Bytes(typ, append([]byte(s), 0)) }
