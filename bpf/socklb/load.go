//go:build linux

package socklb

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Defaults sized for 100k Service frontends and 500k backends.
const (
	DefaultMaxFrontends = 131072
	DefaultMaxBackends  = 524288
	DefaultMaxAffinity  = 65536
	DefaultMaxRevNAT    = 131072
	// DefaultEventsBytes sizes kebpf_lb_events: 2730 records of 96 bytes.
	DefaultEventsBytes = 1 << 18
)

// LoadOptions size the maps. Zero fields take the defaults. Changing a size
// while maps are pinned migrates the map at Load (the kernel cannot resize
// one: a new map gets the entries, see mapVersions); a size below the
// entries a map holds makes Load fail.
type LoadOptions struct {
	// MaxFrontends is the total number of frontends (IPv4 + IPv6).
	MaxFrontends int
	// MaxBackends is the total number of backend slots over all services.
	// The kernel map gets twice as many entries: a replaced backend set is
	// written next to the live one before the switch.
	MaxBackends int
	// MaxAffinity bounds ClientIP affinity entries (LRU).
	MaxAffinity int
	// MaxRevNAT bounds translated sockets remembered for recvmsg and
	// getpeername (LRU).
	MaxRevNAT int
	// EventsBytes is the size of the trace ring buffer kebpf_lb_events, a
	// power of two >= the page size. Like the other sizes it is fixed
	// while the map is pinned.
	EventsBytes int
	// DestroyNetns lists the network namespaces (paths such as
	// /proc/<pid>/ns/net or /run/netns/x) in which Apply and Delete destroy
	// connected UDP sockets to removed backends. "" is the agent's own
	// namespace; nil means only that one.
	DestroyNetns func() []string
	// Logger receives warnings about socket destruction; default slog.Default().
	Logger *slog.Logger
}

func (lo LoadOptions) withDefaults() LoadOptions {
	for _, f := range []struct {
		v *int
		d int
	}{
		{&lo.MaxFrontends, DefaultMaxFrontends},
		{&lo.MaxBackends, DefaultMaxBackends},
		{&lo.MaxAffinity, DefaultMaxAffinity},
		{&lo.MaxRevNAT, DefaultMaxRevNAT},
		{&lo.EventsBytes, DefaultEventsBytes},
	} {
		if *f.v <= 0 {
			*f.v = f.d
		}
	}
	if lo.Logger == nil {
		lo.Logger = slog.Default()
	}
	return lo
}

// cgroupObjects are the maps and the cgroup programs; the iterator is
// loaded separately so a kernel without bpf_sock_destroy still gets the LB.
type cgroupObjects struct {
	SocklbMaps
	Connect4 *ebpf.Program `ebpf:"kebpf_connect4"`
	Connect6 *ebpf.Program `ebpf:"kebpf_connect6"`
	Sendmsg4 *ebpf.Program `ebpf:"kebpf_sendmsg4"`
	Sendmsg6 *ebpf.Program `ebpf:"kebpf_sendmsg6"`
	Recvmsg4 *ebpf.Program `ebpf:"kebpf_recvmsg4"`
	Recvmsg6 *ebpf.Program `ebpf:"kebpf_recvmsg6"`
	Getpeer4 *ebpf.Program `ebpf:"kebpf_getpeer4"`
	Getpeer6 *ebpf.Program `ebpf:"kebpf_getpeer6"`
}

func (c *cgroupObjects) program(name string) *ebpf.Program {
	switch name {
	case SocklbProgKebpfConnect4:
		return c.Connect4
	case SocklbProgKebpfConnect6:
		return c.Connect6
	case SocklbProgKebpfSendmsg4:
		return c.Sendmsg4
	case SocklbProgKebpfSendmsg6:
		return c.Sendmsg6
	case SocklbProgKebpfRecvmsg4:
		return c.Recvmsg4
	case SocklbProgKebpfRecvmsg6:
		return c.Recvmsg6
	case SocklbProgKebpfGetpeer4:
		return c.Getpeer4
	case SocklbProgKebpfGetpeer6:
		return c.Getpeer6
	}
	return nil
}

func (c *cgroupObjects) Close() error {
	var errs []error
	for _, h := range hooks {
		if p := c.program(h.Prog); p != nil {
			errs = append(errs, p.Close())
		}
	}
	errs = append(errs, c.SocklbMaps.Close())
	return errors.Join(errs...)
}

type killObjects struct {
	Kill *ebpf.Program `ebpf:"kebpf_udp_kill"`
}

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (an agent restart keeps every service), otherwise created and pinned; the
// in-memory index is rebuilt from them. pinDir must be on a bpffs.
func Load(pinDir string, opts ...LoadOptions) (*Objects, error) {
	var lo LoadOptions
	if len(opts) > 0 {
		lo = opts[0]
	}
	lo = lo.withDefaults()
	if err := pins.MkdirAll(MapPinDir(pinDir), filepath.Join(pinDir, "links")); err != nil {
		return nil, err
	}
	spec, err := LoadSocklb()
	if err != nil {
		return nil, fmt.Errorf("load socklb spec: %w", err)
	}
	spec.Maps[SocklbMapKebpfLbSvc4].MaxEntries = uint32(lo.MaxFrontends)
	spec.Maps[SocklbMapKebpfLbSvc6].MaxEntries = uint32(lo.MaxFrontends)
	spec.Maps[SocklbMapKebpfLbBe].MaxEntries = uint32(2 * lo.MaxBackends)
	spec.Maps[SocklbMapKebpfLbAff].MaxEntries = uint32(lo.MaxAffinity)
	spec.Maps[SocklbMapKebpfLbRev].MaxEntries = uint32(lo.MaxRevNAT)
	spec.Maps[SocklbMapKebpfLbEvents].MaxEntries = uint32(lo.EventsBytes)

	o := &Objects{
		pinDir: pinDir,
		opts:   lo,
		links:  map[string]link.Link{},
		svcs:   map[uint32]*svcState{},
		owner:  map[Frontend]uint32{},
	}
	// Pinned maps whose layout changed (a size option, an upgrade) are
	// replaced by copies the new programs accept; the old programs keep the
	// old maps until Attach switches the links (Attach or Close finishes
	// the migration).
	mg, err := pins.MigrateMaps(spec, MapPinDir(pinDir), mapVersions, lo.Logger)
	if err != nil {
		return nil, err
	}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		// Nothing runs on the new maps: put the old ones back.
		return nil, errors.Join(pins.LoadError("socklb", err), mg.Abort())
	}
	o.migration = mg

	// The iterator shares the rev-NAT, request and trace maps with the
	// objects above; a failure here (no bpf_sock_destroy) only disables socket
	// destruction.
	var ko killObjects
	kopts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		SocklbMapKebpfLbRev:    o.objs.KebpfLbRev,
		SocklbMapKebpfLbKill:   o.objs.KebpfLbKill,
		SocklbMapKebpfLbEvents: o.objs.KebpfLbEvents,
		SocklbMapKebpfLbLost:   o.objs.KebpfLbLost,
		SocklbMapKebpfLbCfg:    o.objs.KebpfLbCfg,
	}}
	if err := spec.LoadAndAssign(&ko, kopts); err != nil {
		o.killErr = pins.LoadError(KillProgramName, err)
		lo.Logger.Warn("socket destroy unavailable", "err", o.killErr)
	} else {
		o.kill = ko.Kill
	}

	if err := o.rebuild(); err != nil {
		// Not attached yet: the old programs still run on the old maps.
		aerr := o.migration.Abort()
		o.migration = nil
		o.Close()
		return nil, errors.Join(err, aerr)
	}
	return o, nil
}
