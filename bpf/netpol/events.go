//go:build linux

package netpol

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
)

// EventsMap is the ring buffer of verdict events (see Event).
func (o *Objects) EventsMap() *ebpf.Map { return o.objs.KebpfNpEvents }

// EventsLost is how many events the datapath could not write because the
// ring buffer was full, summed over CPUs, since the maps were first pinned
// (it survives agent restarts: readers take differences).
func (o *Objects) EventsLost() (uint64, error) {
	var per []uint64
	if err := o.objs.KebpfNpLost.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read %s: %w", NetpolMapKebpfNpLost, err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

// EventSize is the size of one kebpf_np_events record.
const EventSize = 64

// Event is one kebpf_np_events record: the verdict on a new flow (or on an
// untracked flow, at most once a second per flow and outcome).
type Event struct {
	At       time.Duration // CLOCK_MONOTONIC
	Endpoint uint32
	PolicyID uint32
	Rule     uint16
	Verdict  uint8
	Reason   uint8
	Dir      Direction
	Proto    Proto
	Src, Dst netip.AddrPort
}

// ParseEvent decodes one ring buffer record (struct event in netpol.c).
func ParseEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("parse event: %d bytes, want %d", len(b), EventSize)
	}
	ne := binary.NativeEndian
	fam := b[22]
	var s, d [16]byte
	copy(s[:], b[28:44])
	copy(d[:], b[44:60])
	return Event{
		At:       time.Duration(ne.Uint64(b[0:])),
		Endpoint: ne.Uint32(b[8:]),
		PolicyID: ne.Uint32(b[12:]),
		Rule:     ne.Uint16(b[16:]),
		Verdict:  b[18],
		Reason:   b[19],
		Dir:      Direction(b[20]),
		Proto:    Proto(b[21]),
		Src:      netip.AddrPortFrom(bytesAddr(fam, s), binary.BigEndian.Uint16(b[24:])),
		Dst:      netip.AddrPortFrom(bytesAddr(fam, d), binary.BigEndian.Uint16(b[26:])),
	}, nil
}
