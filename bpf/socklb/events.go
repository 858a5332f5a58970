//go:build linux

package socklb

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// EventsMap is the ring buffer of trace events (see Event).
func (o *Objects) EventsMap() *ebpf.Map { return o.objs.KebpfLbEvents }

// EventsLost is how many events the programs could not write because the
// ring buffer was full, summed over CPUs, since the maps were first pinned
// (it survives agent restarts: readers take differences).
func (o *Objects) EventsLost() (uint64, error) {
	return pinsSum(o.objs.KebpfLbLost, SocklbMapKebpfLbLost)
}

// SetTrace switches trace events on or off. Off, the hooks do one inlined
// array load more than without tracing and write nothing. The switch is a
// pinned map: it survives agent restarts. A fresh map has tracing on.
func (o *Objects) SetTrace(on bool) error {
	var c SocklbLbCfg
	if !on {
		c.TraceOff = 1
	}
	if err := o.objs.KebpfLbCfg.Put(uint32(0), &c); err != nil {
		return fmt.Errorf("write %s: %w", SocklbMapKebpfLbCfg, err)
	}
	return nil
}

// Tracing reports whether the hooks write trace events.
func (o *Objects) Tracing() (bool, error) {
	var c SocklbLbCfg
	if err := o.objs.KebpfLbCfg.Lookup(uint32(0), &c); err != nil {
		return false, fmt.Errorf("read %s: %w", SocklbMapKebpfLbCfg, err)
	}
	return c.TraceOff == 0, nil
}

func pinsSum(m *ebpf.Map, name string) (uint64, error) {
	var per []uint64
	if err := m.Lookup(uint32(0), &per); err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}
