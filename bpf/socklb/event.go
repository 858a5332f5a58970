package socklb

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
)

// EventSize is the size of one kebpf_lb_events record (struct lb_event).
const EventSize = 96

// Verdict is what the socket LB decided (lb_event.verdict, EV_* in socklb.c).
type Verdict uint8

const (
	// VerdictTranslated: connect() (or an unconnected UDP sendmsg() to a
	// backend the socket had not reached before) was sent to Backend.
	VerdictTranslated Verdict = 1
	// VerdictRefused: the frontend has no endpoints; the call failed with
	// ECONNREFUSED.
	VerdictRefused Verdict = 2
	// VerdictDestroyed: a connected UDP socket whose backend left the
	// service was destroyed (by the iterator the agent runs: the event has
	// no process, only the socket's cgroup).
	VerdictDestroyed Verdict = 3
)

func (v Verdict) String() string {
	switch v {
	case VerdictTranslated:
		return "translated"
	case VerdictRefused:
		return "refused"
	case VerdictDestroyed:
		return "destroyed"
	}
	return fmt.Sprintf("verdict-%d", uint8(v))
}

// Hook is the program that wrote an event (lb_event.hook).
type Hook uint8

const (
	HookConnect Hook = 1
	HookSendmsg Hook = 2
	HookIter    Hook = 3
)

// Event is one kebpf_lb_events record.
type Event struct {
	At       time.Duration // CLOCK_MONOTONIC (bpf_ktime_get_ns)
	CgroupID uint64        // caller's cgroup v2 id; destroyed: the socket's
	Cookie   uint64        // socket cookie
	PID, TID uint32        // caller; 0 for destroyed
	// ServiceID is the service (Service.ID) of the frontend; 0 for a
	// destroy requested without one (DestroySocketsTo).
	ServiceID uint32
	Verdict   Verdict
	Hook      Hook
	Proto     Proto
	// Frontend is the address the application dialed (v4-mapped dials are
	// reported as IPv4); Backend the chosen one (invalid when refused).
	Frontend netip.AddrPort
	Backend  netip.AddrPort
	Comm     string // bpf_get_current_comm; "" for destroyed
}

// ParseEvent decodes one ring buffer record (struct lb_event in socklb.c).
func ParseEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("parse lb event: %d bytes, want %d", len(b), EventSize)
	}
	ne := binary.NativeEndian
	v4 := b[39] == 4 // FAM4
	ev := Event{
		At:        time.Duration(ne.Uint64(b[0:])),
		CgroupID:  ne.Uint64(b[8:]),
		Cookie:    ne.Uint64(b[16:]),
		PID:       ne.Uint32(b[24:]),
		TID:       ne.Uint32(b[28:]),
		ServiceID: ne.Uint32(b[32:]),
		Verdict:   Verdict(b[36]),
		Hook:      Hook(b[37]),
		Proto:     Proto(b[38]),
	}
	// Ports are __be16: network order in memory.
	ev.Frontend = netip.AddrPortFrom(rawAddr(b[40:56], v4), binary.BigEndian.Uint16(b[72:]))
	if ev.Verdict != VerdictRefused {
		ev.Backend = netip.AddrPortFrom(rawAddr(b[56:72], v4), binary.BigEndian.Uint16(b[74:]))
	}
	comm := b[80:96]
	if i := bytes.IndexByte(comm, 0); i >= 0 {
		comm = comm[:i]
	}
	ev.Comm = string(comm)
	return ev, nil
}

// rawAddr reads a __be32[4] address: IPv4 in the first word.
func rawAddr(b []byte, v4 bool) netip.Addr {
	if v4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16([16]byte(b[:16]))
}
