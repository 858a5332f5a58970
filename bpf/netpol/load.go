//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Defaults: a node with a few hundred pods, each with up to a few hundred
// peer prefixes, and a busy flow table.
const (
	DefaultMaxEndpoints     = 4096
	DefaultMaxPolicyEntries = 65536
	DefaultMaxCT            = 262144
	DefaultMaxVerdicts      = 65536
	DefaultEventsBytes      = 1 << 18
	DefaultMaxHostIPs       = 256
)

// Conntrack timeouts (LoadOptions overrides them). Idle time after which a
// flow entry is ignored and the next packet judged as a new flow.
const (
	DefaultTCPSynTimeout         = 60 * time.Second
	DefaultTCPEstablishedTimeout = 6 * time.Hour
	DefaultTCPCloseTimeout       = 10 * time.Second
	DefaultUDPTimeout            = 60 * time.Second
	DefaultSCTPTimeout           = 60 * time.Second
	DefaultICMPTimeout           = 30 * time.Second
	DefaultOtherTimeout          = 60 * time.Second
)

// LoadOptions size the maps and set the conntrack timeouts. Zero fields take
// the defaults. Changing a map size while the maps are pinned migrates the
// map at Load (the kernel cannot resize one: a new map gets the entries,
// see mapVersions); a size below the entries a map holds makes Load fail.
type LoadOptions struct {
	// MaxEndpoints bounds the local pods with programs attached.
	MaxEndpoints int
	// MaxPolicyEntries bounds the peer prefixes over all endpoints and
	// directions. An apply needs room for the endpoint's old and new
	// entries at once (they coexist until the generation flip).
	MaxPolicyEntries int
	// MaxCT bounds tracked flows (LRU: the oldest are evicted when full).
	MaxCT int
	// MaxVerdicts bounds the last-verdict-per-flow map (LRU).
	MaxVerdicts int
	// EventsBytes is the ring buffer size, a power of two >= the page size.
	EventsBytes int

	TCPSynTimeout         time.Duration
	TCPEstablishedTimeout time.Duration
	TCPCloseTimeout       time.Duration
	UDPTimeout            time.Duration
	SCTPTimeout           time.Duration
	ICMPTimeout           time.Duration
	OtherTimeout          time.Duration

	// Attach selects the hook mechanism; the zero value is AttachAuto.
	Attach AttachMode

	// Logger receives warnings (re-attach failures at Load); default slog.Default().
	Logger *slog.Logger

	// noAttach leaves programs unattached (prog.Run tests write the maps
	// for ifindex 1 without touching the host's loopback).
	noAttach bool
}

func (lo LoadOptions) withDefaults() LoadOptions {
	def(&lo.MaxEndpoints, DefaultMaxEndpoints)
	def(&lo.MaxPolicyEntries, DefaultMaxPolicyEntries)
	def(&lo.MaxCT, DefaultMaxCT)
	def(&lo.MaxVerdicts, DefaultMaxVerdicts)
	def(&lo.EventsBytes, DefaultEventsBytes)
	def(&lo.TCPSynTimeout, DefaultTCPSynTimeout)
	def(&lo.TCPEstablishedTimeout, DefaultTCPEstablishedTimeout)
	def(&lo.TCPCloseTimeout, DefaultTCPCloseTimeout)
	def(&lo.UDPTimeout, DefaultUDPTimeout)
	def(&lo.SCTPTimeout, DefaultSCTPTimeout)
	def(&lo.ICMPTimeout, DefaultICMPTimeout)
	def(&lo.OtherTimeout, DefaultOtherTimeout)
	if lo.Logger == nil {
		lo.Logger = slog.Default()
	}
	return lo
}

// def sets *v to d unless positive.
func def[T int | time.Duration](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (policy, flows and counters survive restarts), otherwise created there.
// The endpoints found in the maps are read back (Endpoints) and their pinned
// links switched to the new programs. pinDir must be on a bpffs.
func Load(pinDir string, opts LoadOptions) (*Objects, error) {
	lo := opts.withDefaults()
	if err := pins.MkdirAll(MapPinDir(pinDir), filepath.Join(pinDir, "links")); err != nil {
		return nil, err
	}
	spec, err := LoadNetpol()
	if err != nil {
		return nil, fmt.Errorf("load netpol spec: %w", err)
	}
	sizes := map[string]int{
		NetpolMapKebpfNpEp:     lo.MaxEndpoints,
		NetpolMapKebpfNpIp:     lo.MaxEndpoints * MaxEndpointIPs,
		NetpolMapKebpfNpCnt:    lo.MaxEndpoints,
		NetpolMapKebpfNpPol:    lo.MaxPolicyEntries,
		NetpolMapKebpfNpCt:     lo.MaxCT,
		NetpolMapKebpfNpVerd:   lo.MaxVerdicts,
		NetpolMapKebpfNpEvents: lo.EventsBytes,
	}
	for name, n := range sizes {
		spec.Maps[name].MaxEntries = uint32(n)
	}
	timeouts := map[string]time.Duration{
		NetpolVarCtTcpSynNs:   lo.TCPSynTimeout,
		NetpolVarCtTcpEstNs:   lo.TCPEstablishedTimeout,
		NetpolVarCtTcpCloseNs: lo.TCPCloseTimeout,
		NetpolVarCtUdpNs:      lo.UDPTimeout,
		NetpolVarCtSctpNs:     lo.SCTPTimeout,
		NetpolVarCtIcmpNs:     lo.ICMPTimeout,
		NetpolVarCtOtherNs:    lo.OtherTimeout,
	}
	for name, d := range timeouts {
		if err := spec.Variables[name].Set(uint64(d.Nanoseconds())); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}

	mode, err := lo.Attach.resolve()
	if err != nil {
		return nil, err
	}
	if mode == AttachTCX && !lo.noAttach && !tcxSupported() {
		return nil, fmt.Errorf("attach mode tcx: %w: the kernel has no tcx (< 6.6), use clsact", link.ErrNotSupported)
	}
	o := &Objects{pinDir: pinDir, opts: lo, mode: mode, eps: map[uint32]*epState{},
		links: map[int][2]link.Link{}, filters: map[int]bool{}}
	// Pinned maps whose layout changed (a size option, an upgrade) are
	// replaced by copies the new programs accept; the old programs keep the
	// old maps until rebuild switches their links.
	mg, err := pins.MigrateMaps(spec, MapPinDir(pinDir), mapVersions, lo.Logger)
	if err != nil {
		return nil, err
	}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		// Nothing runs on the new maps: put the old ones back.
		return nil, errors.Join(pins.LoadError("netpol", err), mg.Abort())
	}
	rerr := o.rebuild()
	// After rebuild (also a failed one) links may run the new programs:
	// the new maps are the live ones, so catch up instead of aborting.
	if err := mg.Finish(); err != nil {
		o.opts.Logger.Warn("catch up migrated maps", "err", err)
	}
	if rerr != nil {
		o.objs.Close()
		return nil, rerr
	}
	return o, nil
}

// rebuild reads the endpoints and their live policy generation back from
// the maps, deletes what an interrupted apply or delete left behind, and
// switches the pinned links to this process's programs.
func (o *Objects) rebuild() error {
	eps, keys, err := o.readMaps()
	if err != nil {
		return err
	}
	for id, st := range eps {
		o.eps[id] = st
		o.polEntries += len(st.keys)
		o.rev = max(o.rev, st.rev)
	}
	for _, k := range keys.stale {
		if err := o.objs.KebpfNpPol.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete stale policy entry: %w", err)
		}
	}
	if err := o.syncPodIPs(); err != nil {
		return err
	}
	if o.opts.noAttach {
		return nil
	}
	for _, st := range o.eps {
		if err := o.attach(st.policy.IfIndex); err != nil {
			// The pod's interface may be gone while the agent was down;
			// the agent deletes or re-applies the endpoint when it syncs.
			o.opts.Logger.Warn("re-attach network policy programs", "endpoint", st.policy.ID,
				"ifindex", st.policy.IfIndex, "err", err)
		}
	}
	return nil
}
