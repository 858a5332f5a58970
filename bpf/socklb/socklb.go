//go:build linux

// Package socklb is the connect-time service load balancer: cgroup
// connect/sendmsg programs translate Service frontends to backends before a
// socket ever sends a packet, recvmsg/getpeername programs show the
// application the frontend again, and an iter/udp program destroys
// connected UDP sockets whose backend went away.
//
// Maps live under <pinDir>/maps and links under <pinDir>/links/socklb_<hook>,
// so translation keeps working while the agent restarts; a new agent reads
// the maps back (Services) and swaps its programs into the pinned links.
package socklb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

const (
	// Feature is the name reported in NodeState.Status.Active and used by
	// the live feature switch (`disable service-lb`).
	Feature = "service-lb"
	// LinkPinPrefix prefixes the pinned link file names under <pinDir>/links.
	LinkPinPrefix = "socklb_"
	// KillProgramName is the iter/udp program that destroys sockets.
	KillProgramName = SocklbProgKebpfUdpKill
)

// Defaults sized for 100k Service frontends and 500k backends.
const (
	DefaultMaxFrontends = 131072
	DefaultMaxBackends  = 524288
	DefaultMaxAffinity  = 65536
	DefaultMaxRevNAT    = 131072
)

// genSlot is the first slot of the second backend generation; a service's
// live slots are [base, base+count) with base 0 or genSlot.
const genSlot uint32 = 1 << 31

// Stat slots; keep in sync with the STAT_* enum in socklb.c.
const (
	statTranslated uint32 = iota
	statRefused
	statPassed
	statMax
)

// Address family tags in rev-NAT and kill entries (FAM4/FAM6 in socklb.c).
const (
	fam4 uint8 = 4
	fam6 uint8 = 6
)

// LoadOptions size the maps. Zero fields take the defaults. Changing a size
// while maps are pinned makes Load fail (the kernel cannot resize a map):
// Detach first.
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
	// DestroyNetns lists the network namespaces (paths such as
	// /proc/<pid>/ns/net or /run/netns/x) in which Apply and Delete destroy
	// connected UDP sockets to removed backends. "" is the agent's own
	// namespace; nil means only that one.
	DestroyNetns func() []string
	// Logger receives warnings about socket destruction; default slog.Default().
	Logger *slog.Logger
}

func (lo LoadOptions) withDefaults() LoadOptions {
	if lo.MaxFrontends <= 0 {
		lo.MaxFrontends = DefaultMaxFrontends
	}
	if lo.MaxBackends <= 0 {
		lo.MaxBackends = DefaultMaxBackends
	}
	if lo.MaxAffinity <= 0 {
		lo.MaxAffinity = DefaultMaxAffinity
	}
	if lo.MaxRevNAT <= 0 {
		lo.MaxRevNAT = DefaultMaxRevNAT
	}
	if lo.Logger == nil {
		lo.Logger = slog.Default()
	}
	return lo
}

// hook is one cgroup attachment.
type hook struct {
	name   string // link pin suffix
	prog   string // program name
	attach ebpf.AttachType
}

var hooks = []hook{
	{"connect4", SocklbProgKebpfConnect4, ebpf.AttachCGroupInet4Connect},
	{"connect6", SocklbProgKebpfConnect6, ebpf.AttachCGroupInet6Connect},
	{"sendmsg4", SocklbProgKebpfSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
	{"sendmsg6", SocklbProgKebpfSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	{"recvmsg4", SocklbProgKebpfRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{"recvmsg6", SocklbProgKebpfRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
	{"getpeer4", SocklbProgKebpfGetpeer4, ebpf.AttachCgroupInet4GetPeername},
	{"getpeer6", SocklbProgKebpfGetpeer6, ebpf.AttachCgroupInet6GetPeername},
}

// pinnedMaps are the maps that carry state across restarts.
var pinnedMaps = []string{
	SocklbMapKebpfLbSvc4, SocklbMapKebpfLbSvc6, SocklbMapKebpfLbBe,
	SocklbMapKebpfLbAff, SocklbMapKebpfLbRev, SocklbMapKebpfLbStats,
}

// Hooks lists the hook names (link pin suffixes) in attach order.
func Hooks() []string {
	names := make([]string, len(hooks))
	for i, h := range hooks {
		names[i] = h.name
	}
	return names
}

// LinkPinPath is where the link of hook (e.g. "connect4") is pinned.
func LinkPinPath(pinDir, hook string) string {
	return filepath.Join(pinDir, "links", LinkPinPrefix+hook)
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string {
	return filepath.Join(pinDir, "maps")
}

// MapPinPaths lists the pin files of the persistent maps.
func MapPinPaths(pinDir string) []string {
	paths := make([]string, len(pinnedMaps))
	for i, m := range pinnedMaps {
		paths[i] = filepath.Join(MapPinDir(pinDir), m)
	}
	return paths
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
		if p := c.program(h.prog); p != nil {
			errs = append(errs, p.Close())
		}
	}
	errs = append(errs, c.SocklbMaps.Close())
	return errors.Join(errs...)
}

type killObjects struct {
	Kill *ebpf.Program `ebpf:"kebpf_udp_kill"`
}

// svcState is what this process knows it wrote for one service.
type svcState struct {
	frontends []Frontend
	backends  []Backend
	base      uint32
	affinity  time.Duration
}

// Objects is the loaded socket LB: programs, pinned maps, and after Attach
// the cgroup links. It implements Datapath against the pinned maps.
type Objects struct {
	objs    cgroupObjects
	kill    *ebpf.Program // nil when bpf_sock_destroy is unavailable
	killErr error
	links   map[string]link.Link
	pinDir  string
	opts    LoadOptions

	mu           sync.Mutex
	svcs         map[uint32]*svcState
	owner        map[Frontend]uint32
	usedBackends int
}

var _ Datapath = (*Objects)(nil)

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (an agent restart keeps every service), otherwise created and pinned; the
// in-memory index is rebuilt from them. pinDir must be on a bpffs.
func Load(pinDir string, opts ...LoadOptions) (*Objects, error) {
	var lo LoadOptions
	if len(opts) > 0 {
		lo = opts[0]
	}
	lo = lo.withDefaults()
	for _, dir := range []string{MapPinDir(pinDir), filepath.Join(pinDir, "links")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create pin dir: %w", err)
		}
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

	o := &Objects{
		pinDir: pinDir,
		opts:   lo,
		links:  map[string]link.Link{},
		svcs:   map[uint32]*svcState{},
		owner:  map[Frontend]uint32{},
	}
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		return nil, loadErr("socklb", err)
	}

	// The iterator shares the rev-NAT and request maps with the objects
	// above; a failure here (no bpf_sock_destroy) only disables socket
	// destruction.
	var ko killObjects
	kopts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		SocklbMapKebpfLbRev:  o.objs.KebpfLbRev,
		SocklbMapKebpfLbKill: o.objs.KebpfLbKill,
	}}
	if err := spec.LoadAndAssign(&ko, kopts); err != nil {
		o.killErr = loadErr(KillProgramName, err)
		lo.Logger.Warn("socket destroy unavailable", "err", o.killErr)
	} else {
		o.kill = ko.Kill
	}

	if err := o.rebuild(); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}

func loadErr(what string, err error) error {
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return fmt.Errorf("load %s: %+v", what, verr)
	}
	return fmt.Errorf("load %s: %w", what, err)
}

// SocketDestroyError is nil when DestroySocketsTo works, else why not.
func (o *Objects) SocketDestroyError() error { return o.killErr }

// Datapath returns o as the agent's map layer.
func (o *Objects) Datapath() Datapath { return o }

// Attach attaches every program at the cgroup v2 directory cgroupPath and
// pins each link. Like sockstats it is idempotent across restarts: a pinned
// link for the same cgroup gets the new program swapped in (no window
// without translation, never two attachments); one for another cgroup is
// detached and replaced.
func (o *Objects) Attach(cgroupPath string) error {
	if len(o.links) > 0 {
		return errors.New("attach socklb: already attached")
	}
	var fresh []link.Link
	for _, h := range hooks {
		l, created, err := o.attachHook(h, cgroupPath)
		if err != nil {
			// Undo only what this call attached anew: swapped pinned links
			// keep running the (equivalent) new program.
			for _, f := range fresh {
				pins.DetachAndClose(f)
			}
			for _, l := range o.links {
				l.Close()
			}
			o.links = map[string]link.Link{}
			return err
		}
		if created {
			fresh = append(fresh, l)
		}
		o.links[h.name] = l
	}
	return nil
}

func (o *Objects) attachHook(h hook, cgroupPath string) (link.Link, bool, error) {
	pin := LinkPinPath(o.pinDir, h.name)
	prog := o.objs.program(h.prog)

	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		same, serr := pins.SameCgroup(l, cgroupPath)
		if serr == nil && same {
			if err := l.Update(prog); err != nil {
				l.Close()
				return nil, false, fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return l, false, nil
		}
		if err := pins.DetachAndClose(l); err != nil {
			return nil, false, fmt.Errorf("replace pinned link %s: %w", pin, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, false, fmt.Errorf("load pinned link %s: %w", pin, err)
	}

	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.attach, Program: prog})
	if err != nil {
		return nil, false, fmt.Errorf("attach %s to %s: %w", h.prog, cgroupPath, err)
	}
	if err := l.Pin(pin); err != nil {
		// Without a pin the attachment would vanish with this process.
		l.Close()
		return nil, false, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, true, nil
}

// Attached reports whether Attach succeeded.
func (o *Objects) Attached() bool { return len(o.links) > 0 }

// Close releases this process's handles. Pinned links and maps stay, so
// translation continues; use Detach to remove it.
func (o *Objects) Close() error {
	var errs []error
	for name, l := range o.links {
		if err := l.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close link %s: %w", name, err))
		}
	}
	o.links = map[string]link.Link{}
	if o.kill != nil {
		errs = append(errs, o.kill.Close())
		o.kill = nil
	}
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// Detach removes every attachment and every pin (links and maps), then
// closes everything: the service LB is gone until the next Load+Attach.
func (o *Objects) Detach() error {
	var errs []error
	for name, l := range o.links {
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", name, err))
		}
	}
	o.links = map[string]link.Link{}
	if err := detachPinnedLinks(o.pinDir); err != nil {
		errs = append(errs, err)
	}
	for _, m := range []*ebpf.Map{o.objs.KebpfLbSvc4, o.objs.KebpfLbSvc6, o.objs.KebpfLbBe,
		o.objs.KebpfLbAff, o.objs.KebpfLbRev, o.objs.KebpfLbStats} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin map: %w", err))
		}
	}
	if err := o.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// DetachPinned detaches and unpins every socklb link and unpins its maps
// under pinDir without loading anything (for `kebpf-agent cleanup`).
// Missing pins are not an error.
func DetachPinned(pinDir string) error {
	return errors.Join(detachPinnedLinks(pinDir), pins.RemoveFiles(MapPinPaths(pinDir)))
}

func detachPinnedLinks(pinDir string) error {
	var errs []error
	for _, h := range hooks {
		pin := LinkPinPath(pinDir, h.name)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", pin, err))
			continue
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach pinned link %s: %w", pin, err))
		}
	}
	return errors.Join(errs...)
}

// Stats are verdicts of connect/sendmsg since the stats map was pinned.
type Stats struct {
	Translated uint64
	Refused    uint64
	Passed     uint64
}

// Stats sums the per-CPU verdict counters.
func (o *Objects) Stats() (Stats, error) {
	var sums [statMax]uint64
	for slot := range statMax {
		var perCPU []uint64
		if err := o.objs.KebpfLbStats.Lookup(slot, &perCPU); err != nil {
			return Stats{}, fmt.Errorf("lookup %s[%d]: %w", SocklbMapKebpfLbStats, slot, err)
		}
		for _, v := range perCPU {
			sums[slot] += v
		}
	}
	return Stats{Translated: sums[statTranslated], Refused: sums[statRefused], Passed: sums[statPassed]}, nil
}

// --- encoding ---------------------------------------------------------

// be16 converts a host port to the uint16 whose in-memory (little endian)
// bytes are the port in network order, as __be16 fields hold it.
func be16(p uint16) uint16 { return bits.ReverseBytes16(p) }

// ipWords lays out addr as the kernel's __be32[4]: IPv4 in word 0.
func ipWords(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if a.Is4() {
		b := a.As4()
		w[0] = binary.LittleEndian.Uint32(b[:])
		return w
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return w
}

func wordsIP(w [4]uint32, v4 bool) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.LittleEndian.PutUint32(b[4*i:], w[i])
	}
	if v4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func svc4Key(f Frontend) SocklbSvc4Key {
	return SocklbSvc4Key{Vip: ipWords(f.IP)[0], Port: be16(f.Port), Proto: uint8(f.Proto)}
}

func svc6Key(f Frontend) SocklbSvc6Key {
	return SocklbSvc6Key{Vip: ipWords(f.IP), Port: be16(f.Port), Proto: uint8(f.Proto)}
}

func beVal(b Backend) SocklbBeVal {
	return SocklbBeVal{Ip: ipWords(b.IP), Port: be16(b.Port)}
}

// --- Datapath ---------------------------------------------------------

// Capacity reports how many more frontends and backends fit.
func (o *Objects) Capacity() (freeFrontends, freeBackends int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.opts.MaxFrontends - len(o.owner), o.opts.MaxBackends - o.usedBackends
}

func normalize(svc Service) (Service, error) {
	if svc.ID == 0 {
		return svc, errors.New("service id 0 is reserved")
	}
	if svc.AffinityTimeout < 0 {
		return svc, fmt.Errorf("service %d: negative affinity timeout", svc.ID)
	}
	out := Service{ID: svc.ID, AffinityTimeout: svc.AffinityTimeout}
	if len(svc.Frontends) == 0 {
		return out, fmt.Errorf("service %d: no frontends", svc.ID)
	}
	var v4 bool
	seen := map[Frontend]bool{}
	for i, f := range svc.Frontends {
		f.IP = f.IP.Unmap()
		if !f.IP.IsValid() || f.Port == 0 || f.Proto == 0 {
			return out, fmt.Errorf("service %d: invalid frontend %v", svc.ID, f)
		}
		if i == 0 {
			v4 = f.IP.Is4()
		} else if f.IP.Is4() != v4 {
			return out, fmt.Errorf("service %d: frontends mix IPv4 and IPv6", svc.ID)
		}
		if !seen[f] {
			seen[f] = true
			out.Frontends = append(out.Frontends, f)
		}
	}
	for _, b := range svc.Backends {
		b.IP = b.IP.Unmap()
		if !b.IP.IsValid() || b.Port == 0 {
			return out, fmt.Errorf("service %d: invalid backend %v", svc.ID, b)
		}
		if b.IP.Is4() != v4 {
			return out, fmt.Errorf("service %d: backend %v is not of the frontends' family", svc.ID, b)
		}
		out.Backends = append(out.Backends, b)
	}
	// Frontend order carries no meaning; sorted, an unchanged Apply is a no-op.
	slices.SortFunc(out.Frontends, compareFrontend)
	return out, nil
}

// Apply creates or replaces one service. A frontend that belonged to
// another service moves to this one (a ClusterIP reused before the old
// Service's delete was synced).
func (o *Objects) Apply(in Service) error {
	svc, err := normalize(in)
	if err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()

	old := o.svcs[svc.ID]
	if old != nil && slices.Equal(old.frontends, svc.Frontends) &&
		slices.Equal(old.backends, svc.Backends) && old.affinity == svc.AffinityTimeout {
		return nil
	}

	// Capacity first, so a full map leaves everything as it was.
	newFronts := map[Frontend]bool{}
	added := 0
	for _, f := range svc.Frontends {
		newFronts[f] = true
		if _, ok := o.owner[f]; !ok {
			added++
		}
	}
	var removed []Frontend
	var oldBackends []Backend
	if old != nil {
		for _, f := range old.frontends {
			if !newFronts[f] {
				removed = append(removed, f)
			}
		}
		oldBackends = old.backends
	}
	if n := len(o.owner) - len(removed) + added; n > o.opts.MaxFrontends {
		return fmt.Errorf("apply service %d: %d frontends exceed %d: %w", svc.ID, n, o.opts.MaxFrontends, ErrFull)
	}
	if n := o.usedBackends - len(oldBackends) + len(svc.Backends); n > o.opts.MaxBackends {
		return fmt.Errorf("apply service %d: %d backends exceed %d: %w", svc.ID, n, o.opts.MaxBackends, ErrFull)
	}

	if err := o.applyLocked(svc, old, removed); err != nil {
		// The kernel refused something midway (e.g. ENOMEM): trust the maps,
		// not our plan, so the next (full) sync starts from the truth.
		if rerr := o.rebuild(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return fmt.Errorf("apply service %d: %w", svc.ID, err)
	}
	o.destroyRemoved(svc, oldBackends, old)
	return nil
}

func (o *Objects) applyLocked(svc Service, old *svcState, removed []Frontend) error {
	// Removed frontends go first: they are leaving anyway, and it keeps the
	// transient frontend count within what the capacity check allowed.
	for _, f := range removed {
		if err := o.deleteFrontend(f); err != nil {
			return err
		}
		delete(o.owner, f)
	}
	if old != nil {
		old.frontends = slices.DeleteFunc(old.frontends, func(f Frontend) bool { return slices.Contains(removed, f) })
	}

	var oldBase uint32
	var oldBackends []Backend
	if old != nil {
		oldBase, oldBackends = old.base, old.backends
	}
	n, on := len(svc.Backends), len(oldBackends)
	base := oldBase
	var stale []uint32 // slots to delete after the switch
	switch {
	case old != nil && on > 0 && n >= on && slices.Equal(svc.Backends[:on], oldBackends):
		// Append-only: new slots are invisible until count grows.
		if err := o.writeSlots(svc.ID, base, svc.Backends, on); err != nil {
			return err
		}
	case old != nil && n > 0 && n < on && slices.Equal(oldBackends[:n], svc.Backends):
		// Shrink by dropping the tail: count drops first, then the slots.
		for i := n; i < on; i++ {
			stale = append(stale, base+uint32(i))
		}
	case n == 0:
		for i := range on {
			stale = append(stale, oldBase+uint32(i))
		}
	default:
		// Anything else: build the set in the other generation, switch.
		if old != nil && on > 0 {
			base = oldBase ^ genSlot
		} else {
			base = 0
		}
		if err := o.writeSlots(svc.ID, base, svc.Backends, 0); err != nil {
			o.deleteSlots(svc.ID, base, 0, n)
			return err
		}
		for i := range on {
			stale = append(stale, oldBase+uint32(i))
		}
	}

	val := SocklbSvcVal{Id: svc.ID, Count: uint32(n), Base: base, AffinityNs: uint64(svc.AffinityTimeout.Nanoseconds())}
	for _, f := range svc.Frontends {
		if prev, ok := o.owner[f]; ok && prev != svc.ID {
			if ps := o.svcs[prev]; ps != nil {
				ps.frontends = slices.DeleteFunc(ps.frontends, func(x Frontend) bool { return x == f })
			}
		}
		if err := o.putFrontend(f, &val); err != nil {
			return err
		}
		o.owner[f] = svc.ID
	}
	if old != nil {
		o.usedBackends -= on
	}
	o.usedBackends += n
	o.svcs[svc.ID] = &svcState{
		frontends: slices.Clone(svc.Frontends),
		backends:  slices.Clone(svc.Backends),
		base:      base,
		affinity:  svc.AffinityTimeout,
	}
	var errs []error
	for _, s := range stale {
		if err := o.objs.KebpfLbBe.Delete(SocklbBeKey{Id: svc.ID, Slot: s}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete backend slot %d/%d: %w", svc.ID, s, err))
		}
	}
	return errors.Join(errs...)
}

func (o *Objects) writeSlots(id, base uint32, bs []Backend, from int) error {
	for i := from; i < len(bs); i++ {
		v := beVal(bs[i])
		if err := o.objs.KebpfLbBe.Put(SocklbBeKey{Id: id, Slot: base + uint32(i)}, &v); err != nil {
			return fmt.Errorf("write backend slot %d/%d: %w", id, base+uint32(i), err)
		}
	}
	return nil
}

func (o *Objects) deleteSlots(id, base uint32, from, to int) {
	for i := from; i < to; i++ {
		o.objs.KebpfLbBe.Delete(SocklbBeKey{Id: id, Slot: base + uint32(i)})
	}
}

func (o *Objects) putFrontend(f Frontend, v *SocklbSvcVal) error {
	var err error
	if f.IP.Is4() {
		err = o.objs.KebpfLbSvc4.Put(svc4Key(f), v)
	} else {
		err = o.objs.KebpfLbSvc6.Put(svc6Key(f), v)
	}
	if err != nil {
		return fmt.Errorf("write frontend %v: %w", f, err)
	}
	return nil
}

func (o *Objects) deleteFrontend(f Frontend) error {
	var err error
	if f.IP.Is4() {
		err = o.objs.KebpfLbSvc4.Delete(svc4Key(f))
	} else {
		err = o.objs.KebpfLbSvc6.Delete(svc6Key(f))
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete frontend %v: %w", f, err)
	}
	return nil
}

// Delete removes a service, frontends first so no reader can reach a
// backend slot after it is gone.
func (o *Objects) Delete(id uint32) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	st := o.svcs[id]
	if st == nil {
		return nil
	}
	var errs []error
	for _, f := range st.frontends {
		if err := o.deleteFrontend(f); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(o.owner, f)
	}
	if len(errs) > 0 {
		return fmt.Errorf("delete service %d: %w", id, errors.Join(errs...))
	}
	for i := range st.backends {
		if err := o.objs.KebpfLbBe.Delete(SocklbBeKey{Id: id, Slot: st.base + uint32(i)}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete backend slot %d/%d: %w", id, st.base+uint32(i), err))
		}
	}
	o.usedBackends -= len(st.backends)
	delete(o.svcs, id)
	o.destroyRemoved(Service{ID: id}, st.backends, st)
	if len(errs) > 0 {
		return fmt.Errorf("delete service %d: %w", id, errors.Join(errs...))
	}
	return nil
}

// destroyRemoved destroys connected UDP sockets to backends of a UDP
// service that are no longer in svc. Failures are logged, not returned: the
// maps are already right, and a socket left connected only keeps talking to
// an endpoint that is going away, as it would with kube-proxy's conntrack.
func (o *Objects) destroyRemoved(svc Service, oldBackends []Backend, old *svcState) {
	if o.kill == nil || old == nil || len(oldBackends) == 0 {
		return
	}
	udp := false
	for _, f := range old.frontends {
		udp = udp || f.Proto == UDP
	}
	for _, f := range svc.Frontends {
		udp = udp || f.Proto == UDP
	}
	if !udp {
		return
	}
	netnses := []string{""}
	if o.opts.DestroyNetns != nil {
		netnses = o.opts.DestroyNetns()
	}
	for _, b := range oldBackends {
		if slices.Contains(svc.Backends, b) {
			continue
		}
		for _, ns := range netnses {
			if _, err := o.destroyLocked(ns, b); err != nil {
				o.opts.Logger.Warn("destroy udp sockets", "service", svc.ID, "backend", b, "netns", ns, "err", err)
			}
		}
	}
}

// DestroySocketsTo destroys the connected UDP sockets of the agent's own
// network namespace that socklb translated to b, and returns how many. The
// owners' next send or receive fails, and reconnecting picks a live backend.
func (o *Objects) DestroySocketsTo(b Backend) (int, error) {
	return o.DestroySocketsToIn("", b)
}

// DestroySocketsToIn is DestroySocketsTo for the network namespace at
// netnsPath ("" = own): UDP iterators only walk the namespace they are
// opened in, and pods' sockets live in the pods' namespaces.
func (o *Objects) DestroySocketsToIn(netnsPath string, b Backend) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.destroyLocked(netnsPath, b)
}

func (o *Objects) destroyLocked(netnsPath string, b Backend) (int, error) {
	if o.kill == nil {
		return 0, fmt.Errorf("destroy sockets: %w", o.killErr)
	}
	b.IP = b.IP.Unmap()
	if !b.IP.IsValid() {
		return 0, fmt.Errorf("destroy sockets: invalid backend %v", b)
	}
	req := SocklbKillVal{Ip: ipWords(b.IP), Port: be16(b.Port), Family: fam6}
	if b.IP.Is4() {
		req.Family = fam4
	}
	if err := o.objs.KebpfLbKill.Put(uint32(0), &req); err != nil {
		return 0, fmt.Errorf("write %s: %w", SocklbMapKebpfLbKill, err)
	}
	if err := inNetns(netnsPath, o.runKill); err != nil {
		return 0, err
	}
	var got SocklbKillVal
	if err := o.objs.KebpfLbKill.Lookup(uint32(0), &got); err != nil {
		return 0, fmt.Errorf("read %s: %w", SocklbMapKebpfLbKill, err)
	}
	return int(got.Destroyed), nil
}

func (o *Objects) runKill() error {
	it, err := link.AttachIter(link.IterOptions{Program: o.kill})
	if err != nil {
		return fmt.Errorf("attach %s: %w", KillProgramName, err)
	}
	defer it.Close()
	// The iterator binds to the network namespace of the thread that opens it.
	rd, err := it.Open()
	if err != nil {
		return fmt.Errorf("open %s: %w", KillProgramName, err)
	}
	defer rd.Close()
	if _, err := io.Copy(io.Discard, rd); err != nil {
		return fmt.Errorf("run %s: %w", KillProgramName, err)
	}
	return nil
}

// inNetns runs fn on a thread switched into the network namespace at path.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: if switching back fails, Go retires
		// it instead of handing a thread in a foreign namespace to others.
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer self.Close()
		target, err := os.Open(path)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", path, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leave netns %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// --- reading back -----------------------------------------------------

type liveSvc struct {
	svc     Service
	base    uint32
	count   uint32
	mixed   bool // frontends disagree on {base, count, affinity}
	val     SocklbSvcVal
	fronts4 []SocklbSvc4Key
	fronts6 []SocklbSvc6Key
}

// Services reads every service back from the maps, as the programs see
// them.
func (o *Objects) Services() (map[uint32]Service, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	live, err := o.readMaps()
	if err != nil {
		return nil, err
	}
	out := make(map[uint32]Service, len(live))
	for id, l := range live {
		out[id] = l.svc
	}
	return out, nil
}

func (o *Objects) readMaps() (map[uint32]*liveSvc, error) {
	live := map[uint32]*liveSvc{}
	add := func(f Frontend, v SocklbSvcVal) *liveSvc {
		l := live[v.Id]
		if l == nil {
			l = &liveSvc{base: v.Base, count: v.Count, val: v, svc: Service{
				ID: v.Id, AffinityTimeout: time.Duration(v.AffinityNs),
			}}
			live[v.Id] = l
		} else if l.val != v {
			l.mixed = true
		}
		l.svc.Frontends = append(l.svc.Frontends, f)
		return l
	}
	var k4 SocklbSvc4Key
	var v SocklbSvcVal
	it4 := o.objs.KebpfLbSvc4.Iterate()
	for it4.Next(&k4, &v) {
		f := Frontend{IP: wordsIP([4]uint32{k4.Vip}, true), Port: be16(k4.Port), Proto: Proto(k4.Proto)}
		l := add(f, v)
		l.fronts4 = append(l.fronts4, k4)
	}
	if err := it4.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", SocklbMapKebpfLbSvc4, err)
	}
	var k6 SocklbSvc6Key
	it6 := o.objs.KebpfLbSvc6.Iterate()
	for it6.Next(&k6, &v) {
		f := Frontend{IP: wordsIP(k6.Vip, false), Port: be16(k6.Port), Proto: Proto(k6.Proto)}
		l := add(f, v)
		l.fronts6 = append(l.fronts6, k6)
	}
	if err := it6.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", SocklbMapKebpfLbSvc6, err)
	}
	for id, l := range live {
		v4 := l.svc.Frontends[0].IP.Is4()
		for i := range l.count {
			var bv SocklbBeVal
			if err := o.objs.KebpfLbBe.Lookup(SocklbBeKey{Id: id, Slot: l.base + i}, &bv); err != nil {
				return nil, fmt.Errorf("read backend slot %d/%d: %w", id, l.base+i, err)
			}
			l.svc.Backends = append(l.svc.Backends, Backend{IP: wordsIP(bv.Ip, v4), Port: be16(bv.Port)})
		}
		slices.SortFunc(l.svc.Frontends, compareFrontend)
	}
	return live, nil
}

func compareFrontend(a, b Frontend) int {
	if c := a.IP.Compare(b.IP); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	return int(a.Proto) - int(b.Proto)
}

// rebuild replaces the in-memory index with what the maps hold, repairing
// what an agent that died mid-Apply may have left: frontends of one service
// that disagree are all pointed at the first one's generation, and backend
// slots no frontend points at are deleted.
func (o *Objects) rebuild() error {
	live, err := o.readMaps()
	if err != nil {
		return fmt.Errorf("rebuild index: %w", err)
	}
	for _, l := range live {
		if !l.mixed {
			continue
		}
		for _, k := range l.fronts4 {
			if err := o.objs.KebpfLbSvc4.Put(k, &l.val); err != nil {
				return fmt.Errorf("repair service %d: %w", l.svc.ID, err)
			}
		}
		for _, k := range l.fronts6 {
			if err := o.objs.KebpfLbSvc6.Put(k, &l.val); err != nil {
				return fmt.Errorf("repair service %d: %w", l.svc.ID, err)
			}
		}
	}
	var stale []SocklbBeKey
	var bk SocklbBeKey
	var bv SocklbBeVal
	it := o.objs.KebpfLbBe.Iterate()
	for it.Next(&bk, &bv) {
		l := live[bk.Id]
		if l == nil || bk.Slot < l.base || bk.Slot >= l.base+l.count {
			stale = append(stale, bk)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", SocklbMapKebpfLbBe, err)
	}
	for _, k := range stale {
		if err := o.objs.KebpfLbBe.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete stale slot %d/%d: %w", k.Id, k.Slot, err)
		}
	}

	o.svcs = map[uint32]*svcState{}
	o.owner = map[Frontend]uint32{}
	o.usedBackends = 0
	for id, l := range live {
		o.svcs[id] = &svcState{
			frontends: l.svc.Frontends,
			backends:  l.svc.Backends,
			base:      l.base,
			affinity:  l.svc.AffinityTimeout,
		}
		for _, f := range l.svc.Frontends {
			o.owner[f] = id
		}
		o.usedBackends += len(l.svc.Backends)
	}
	return nil
}
