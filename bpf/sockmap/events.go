//go:build linux

package sockmap

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Verdicts of kebpf_l7_events records (L7_EV_* in sockmap.c).
const (
	// EventSteered: the connect() was rewritten to Envoy's listener.
	EventSteered uint8 = 1
	// EventNoEnvoy: the connect() was refused with EPERM because no Envoy
	// listener is configured for the destination's family (fail closed).
	EventNoEnvoy uint8 = 2
	// EventNoRoom: the connect() was refused with EPERM because the
	// original destination could not be remembered (kebpf_l7_cookie).
	EventNoRoom uint8 = 3
)

// EventsPoll is how often a reader of kebpf_l7_events must look for records
// without being woken: the datapath wakes it only once 32 KiB are waiting
// (EVENTS_WAKEUP_BYTES in sockmap.c), so a lone event waits at most this.
const EventsPoll = 100 * time.Millisecond

// EventSize is the size of one kebpf_l7_events record (struct l7_event).
const EventSize = 80

// Event is one kebpf_l7_events record: a connect() to a steered destination
// that was steered to Envoy or refused. Envoy's own connects are not
// recorded.
type Event struct {
	At       time.Duration // CLOCK_MONOTONIC
	CgroupID uint64        // the caller's cgroup v2 id
	TGID     uint32        // process id
	PID      uint32        // thread id
	Comm     string        // the caller's command
	Verdict  uint8         // Event*
	// Dst is the original destination (the pod IP:port the caller asked
	// for). Src is the socket's bound address when it was bound before
	// connect(); invalid otherwise (the kernel picks it after the hook).
	Dst, Src netip.AddrPort
}

// EventsMap is the ring buffer of steering events (see Event).
func (o *Objects) EventsMap() *ebpf.Map { return o.objs.KebpfL7Events }

// EventsLost is how many events the datapath could not write because the
// ring buffer was full, summed over CPUs, since the maps were first pinned
// (it survives agent restarts: readers take differences).
func (o *Objects) EventsLost() (uint64, error) {
	s, err := pins.SumPerCPU(o.objs.KebpfL7Lost, SockmapMapKebpfL7Lost, 1)
	if err != nil {
		return 0, err
	}
	return s[0], nil
}

// ParseEvent decodes one ring buffer record (struct l7_event in sockmap.c).
func ParseEvent(b []byte) (Event, error) {
	if len(b) < EventSize {
		return Event{}, fmt.Errorf("parse l7 event: %d bytes, want %d", len(b), EventSize)
	}
	ne := binary.NativeEndian
	addr := func(fam byte, off int) netip.Addr {
		switch fam {
		case fam4:
			return netip.AddrFrom4([4]byte(b[off : off+4]))
		case fam6:
			return netip.AddrFrom16([16]byte(b[off : off+16]))
		}
		return netip.Addr{}
	}
	e := Event{
		At:       time.Duration(ne.Uint64(b[0:])),
		CgroupID: ne.Uint64(b[8:]),
		TGID:     ne.Uint32(b[16:]),
		PID:      ne.Uint32(b[20:]),
		Verdict:  b[62],
	}
	comm := b[64:80]
	if i := bytes.IndexByte(comm, 0); i >= 0 {
		comm = comm[:i]
	}
	e.Comm = string(comm)
	// Ports: the destination's in network order, the bound source's in
	// host order (as struct bpf_sock gives each).
	if a := addr(b[60], 24); a.IsValid() {
		e.Dst = netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[56:]))
	}
	if a := addr(b[61], 40); a.IsValid() {
		e.Src = netip.AddrPortFrom(a, ne.Uint16(b[58:]))
	}
	return e, nil
}
