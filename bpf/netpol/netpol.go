//go:build linux

package netpol

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

const (
	// Feature is the name reported in NodeState.Status.Active and used by
	// the live feature switch (`disable policy`).
	Feature = "policy"
	// FromProgramName runs on the host-side veth's ingress: traffic from
	// the pod (the pod's egress).
	FromProgramName = NetpolProgKebpfNpFrom
	// ToProgramName runs on the host-side veth's egress: traffic to the pod
	// (the pod's ingress).
	ToProgramName = NetpolProgKebpfNpTo
	// LinkPinPrefix prefixes the link pins: <pinDir>/links/np_<ifindex>_{from,to}.
	LinkPinPrefix = "np_"
	// MaxEndpointIPs is how many pod addresses an endpoint may list (one per
	// family is all Kubernetes assigns; the rest is headroom).
	MaxEndpointIPs = 4
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

// Verdicts and reasons of Event and Verdict records; keep in sync with
// VERDICT_* and REASON_* in netpol.c.
const (
	VerdictAllow uint8 = 1
	VerdictDeny  uint8 = 2

	ReasonPolicy      uint8 = 0 // a rule allowed it (PolicyID, Rule)
	ReasonDefaultDeny uint8 = 1 // no rule allowed it (PolicyID = DefaultDenyPolicy)
	ReasonNotEnforced uint8 = 2 // no policy selects the pod in this direction
	ReasonHost        uint8 = 3 // the peer is a node address
	ReasonRevoked     uint8 = 4 // established flow denied after a policy change
	ReasonRelated     uint8 = 5 // ICMP error of a tracked flow

	// RuleNone is the rule index of verdicts no rule made.
	RuleNone uint16 = 0xffff
)

const (
	fam4 uint8 = 4
	fam6 uint8 = 6
	// polPrefixBase is the number of LPM key bits before the address:
	// ep_id (32) + dir (8) + gen (8) + family (8) + pad (8).
	polPrefixBase = 64
)

// LoadOptions size the maps and set the conntrack timeouts. Zero fields take
// the defaults. Changing a map size while the maps are pinned makes Load
// fail (the kernel cannot resize a map): Detach first.
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
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&lo.MaxEndpoints, DefaultMaxEndpoints)
	def(&lo.MaxPolicyEntries, DefaultMaxPolicyEntries)
	def(&lo.MaxCT, DefaultMaxCT)
	def(&lo.MaxVerdicts, DefaultMaxVerdicts)
	def(&lo.EventsBytes, DefaultEventsBytes)
	defd(&lo.TCPSynTimeout, DefaultTCPSynTimeout)
	defd(&lo.TCPEstablishedTimeout, DefaultTCPEstablishedTimeout)
	defd(&lo.TCPCloseTimeout, DefaultTCPCloseTimeout)
	defd(&lo.UDPTimeout, DefaultUDPTimeout)
	defd(&lo.SCTPTimeout, DefaultSCTPTimeout)
	defd(&lo.ICMPTimeout, DefaultICMPTimeout)
	defd(&lo.OtherTimeout, DefaultOtherTimeout)
	if lo.Logger == nil {
		lo.Logger = slog.Default()
	}
	return lo
}

// AttachMode is how the programs are hooked to the pod interfaces.
type AttachMode int

const (
	// AttachAuto uses tcx when the kernel has it (6.6+), else clsact. The
	// kernel is probed once per process.
	AttachAuto AttachMode = iota
	// AttachTCX attaches pinned tcx links at the head of the chain. Load
	// fails on a kernel without tcx.
	AttachTCX
	// AttachClsact adds direct-action cls_bpf filters to the interface's
	// clsact qdisc (created when missing) at ClsactPriority/ClsactHandle.
	// Filters are not pinned: they stay until removed, and Detach and
	// DetachPinned find them by name.
	AttachClsact
)

var attachModeNames = [...]string{AttachAuto: "auto", AttachTCX: "tcx", AttachClsact: "clsact"}

func (m AttachMode) String() string {
	if m >= 0 && int(m) < len(attachModeNames) {
		return attachModeNames[m]
	}
	return "AttachMode(" + strconv.Itoa(int(m)) + ")"
}

// ParseAttachMode parses "auto", "tcx" or "clsact" (the String forms).
func ParseAttachMode(s string) (AttachMode, error) {
	for m, name := range attachModeNames {
		if s == name {
			return AttachMode(m), nil
		}
	}
	return 0, fmt.Errorf("attach mode %q: want auto, tcx or clsact", s)
}

// Set and Type make *AttachMode a command-line flag value (pflag.Value,
// flag.Value).
func (m *AttachMode) Set(s string) error {
	v, err := ParseAttachMode(s)
	if err != nil {
		return err
	}
	*m = v
	return nil
}

func (m *AttachMode) Type() string { return "auto|tcx|clsact" }

// tcxSupported probes the kernel for tcx links once per process: creating
// one on a nonexistent interface fails with ENODEV where tcx exists.
var tcxSupported = sync.OnceValue(func() bool {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		// Cannot even load a tc program: let the real attach report it.
		return true
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: int(^uint32(0) >> 1), Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
	}
	return !errors.Is(err, link.ErrNotSupported)
})

// resolve turns AttachAuto into the mode this kernel supports.
func (m AttachMode) resolve() (AttachMode, error) {
	switch m {
	case AttachAuto:
		if tcxSupported() {
			return AttachTCX, nil
		}
		return AttachClsact, nil
	case AttachTCX, AttachClsact:
		return m, nil
	}
	return 0, fmt.Errorf("invalid attach mode %d", m)
}

// hook is one of the two attachments per interface.
type hook struct {
	suffix    string // link pin suffix
	attach    ebpf.AttachType
	clsactDir string // clsact hook
	prog      string // program name, also the cls_bpf filter's TCA_BPF_NAME
}

var hooks = [2]hook{
	{"from", ebpf.AttachTCXIngress, "ingress", FromProgramName},
	{"to", ebpf.AttachTCXEgress, "egress", ToProgramName},
}

// pinnedMaps carry state across restarts; Detach unpins them.
var pinnedMaps = []string{
	NetpolMapKebpfNpEp, NetpolMapKebpfNpPol, NetpolMapKebpfNpCt, NetpolMapKebpfNpHost,
	NetpolMapKebpfNpCnt, NetpolMapKebpfNpVerd, NetpolMapKebpfNpEvents,
}

// MapPinDir is the directory the maps are pinned in (by name).
func MapPinDir(pinDir string) string { return filepath.Join(pinDir, "maps") }

// MapPinPaths lists the pin files of the maps.
func MapPinPaths(pinDir string) []string {
	paths := make([]string, len(pinnedMaps))
	for i, m := range pinnedMaps {
		paths[i] = filepath.Join(MapPinDir(pinDir), m)
	}
	return paths
}

// LinkPinPath is where the link of ifindex's hook ("from" or "to") is pinned.
func LinkPinPath(pinDir string, ifindex int, hook string) string {
	return filepath.Join(pinDir, "links", LinkPinPrefix+strconv.Itoa(ifindex)+"_"+hook)
}

// epState is what the agent last applied to one endpoint.
type epState struct {
	policy EndpointPolicy
	gen    uint8
	rev    uint32
	// keys of the live generation, sorted by prefix length (delete order).
	keys []NetpolPolKey
}

// Objects is the loaded datapath. It implements Datapath.
type Objects struct {
	mu     sync.Mutex
	objs   NetpolObjects
	pinDir string
	opts   LoadOptions
	eps    map[uint32]*epState
	// mode is opts.Attach resolved: AttachTCX or AttachClsact.
	mode AttachMode
	// links by ifindex: [0] from (tcx ingress), [1] to (tcx egress).
	links map[int][2]link.Link
	// filters marks the ifindexes this process put its programs' clsact
	// filters on (AttachClsact).
	filters map[int]bool
	// polEntries counts kebpf_np_pol entries of all live generations.
	polEntries int
	// rev is the last revision handed out; revisions are node-wide so a
	// recycled endpoint ID never matches a stale flow entry's revision.
	rev uint32
}

var _ Datapath = (*Objects)(nil)

// Load loads the programs. Maps are reused from <pinDir>/maps when pinned
// (policy, flows and counters survive restarts), otherwise created there.
// The endpoints found in the maps are read back (Endpoints) and their pinned
// links switched to the new programs. pinDir must be on a bpffs.
func Load(pinDir string, opts LoadOptions) (*Objects, error) {
	lo := opts.withDefaults()
	for _, dir := range []string{MapPinDir(pinDir), filepath.Join(pinDir, "links")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create pin dir: %w", err)
		}
	}
	spec, err := LoadNetpol()
	if err != nil {
		return nil, fmt.Errorf("load netpol spec: %w", err)
	}
	sizes := map[string]int{
		NetpolMapKebpfNpEp:     lo.MaxEndpoints,
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
	copts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: MapPinDir(pinDir)}}
	if err := spec.LoadAndAssign(&o.objs, copts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load netpol: %+v", verr)
		}
		return nil, fmt.Errorf("load netpol: %w", err)
	}
	if err := o.rebuild(); err != nil {
		o.objs.Close()
		return nil, err
	}
	return o, nil
}

// Programs returns the from (pod egress) and to (pod ingress) programs, for
// tests and introspection.
func (o *Objects) Programs() (from, to *ebpf.Program) {
	return o.objs.KebpfNpFrom, o.objs.KebpfNpTo
}

// AttachMode is the mechanism the programs are attached with: AttachTCX or
// AttachClsact (AttachAuto resolved at Load).
func (o *Objects) AttachMode() AttachMode { return o.mode }

// EventsMap is the ring buffer of verdict events (see Event).
func (o *Objects) EventsMap() *ebpf.Map { return o.objs.KebpfNpEvents }

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

type readKeys struct {
	stale []NetpolPolKey
}

// readMaps decodes kebpf_np_ep and kebpf_np_pol into endpoint states.
func (o *Objects) readMaps() (map[uint32]*epState, readKeys, error) {
	eps := map[uint32]*epState{}
	var ifindex uint32
	var ev NetpolEpVal
	it := o.objs.KebpfNpEp.Iterate()
	for it.Next(&ifindex, &ev) {
		p := EndpointPolicy{
			ID:                ev.Id,
			IfIndex:           int(ifindex),
			IngressEnforced:   ev.Flags&(1<<Ingress) != 0,
			EgressEnforced:    ev.Flags&(1<<Egress) != 0,
			DefaultDenyPolicy: ev.DenyPolicy,
		}
		for i := 0; i < int(ev.Nips) && i < MaxEndpointIPs; i++ {
			p.IPs = append(p.IPs, bytesAddr(ev.IpFam[i], ev.Ips[i]))
		}
		eps[ev.Id] = &epState{policy: p, gen: ev.Gen, rev: ev.Rev}
	}
	if err := it.Err(); err != nil {
		return nil, readKeys{}, fmt.Errorf("read %s: %w", NetpolMapKebpfNpEp, err)
	}

	var rk readKeys
	var k NetpolPolKey
	var v NetpolPolVal
	pit := o.objs.KebpfNpPol.Iterate()
	for pit.Next(&k, &v) {
		st := eps[k.EpId]
		if st == nil || st.gen != k.Gen {
			rk.stale = append(rk.stale, k)
			continue
		}
		pe := PeerEntry{Prefix: keyPrefix(k)}
		for i := 0; i < int(v.N) && i < MaxRulesPerPrefix; i++ {
			r := v.Rules[i]
			pe.Rules = append(pe.Rules, PortRule{Proto: Proto(r.Proto), PortLo: r.PortLo, PortHi: r.PortHi, PolicyID: r.PolicyId, Rule: r.Idx})
		}
		if Direction(k.Dir) == Ingress {
			st.policy.Ingress = append(st.policy.Ingress, pe)
		} else {
			st.policy.Egress = append(st.policy.Egress, pe)
		}
		st.keys = append(st.keys, k)
	}
	if err := pit.Err(); err != nil {
		return nil, readKeys{}, fmt.Errorf("read %s: %w", NetpolMapKebpfNpPol, err)
	}
	for _, st := range eps {
		sortPeers(st.policy.Ingress)
		sortPeers(st.policy.Egress)
		sortKeys(st.keys)
	}
	return eps, rk, nil
}

func sortPeers(ps []PeerEntry) {
	slices.SortFunc(ps, func(a, b PeerEntry) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits())
	})
}

// sortKeys orders keys shortest prefix first: deleting an old generation
// in this order never leaves a shorter, wrong match for a packet that still
// reads it (see netpol.c).
func sortKeys(ks []NetpolPolKey) {
	slices.SortStableFunc(ks, func(a, b NetpolPolKey) int { return cmp.Compare(a.Prefixlen, b.Prefixlen) })
}

// Endpoints reads the programmed endpoints back from the maps (the kernel's
// view, also after an agent restart), keyed by endpoint ID. Peer entries are
// sorted by prefix.
func (o *Objects) Endpoints() (map[uint32]EndpointPolicy, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	eps, _, err := o.readMaps()
	if err != nil {
		return nil, err
	}
	out := make(map[uint32]EndpointPolicy, len(eps))
	for id, st := range eps {
		out[id] = st.policy
	}
	return out, nil
}

func addrBytes(a netip.Addr) (uint8, [16]byte) {
	var b [16]byte
	if a.Is4() || a.Is4In6() {
		v4 := a.Unmap().As4()
		copy(b[:], v4[:])
		return fam4, b
	}
	return fam6, a.As16()
}

func bytesAddr(fam uint8, b [16]byte) netip.Addr {
	if fam == fam4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func addrWords(a netip.Addr) (uint8, [4]uint32) {
	fam, b := addrBytes(a)
	var w [4]uint32
	for i := range w {
		// The kernel compares the raw bytes: keep network byte order in memory.
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return fam, w
}

func wordsAddr(fam uint8, w [4]uint32) netip.Addr {
	var b [16]byte
	for i, x := range w {
		binary.NativeEndian.PutUint32(b[4*i:], x)
	}
	return bytesAddr(fam, b)
}

func keyPrefix(k NetpolPolKey) netip.Prefix {
	return netip.PrefixFrom(bytesAddr(k.Family, k.Addr), int(k.Prefixlen)-polPrefixBase)
}

// normalize validates p and returns it with masked prefixes and explicit
// port ranges.
func normalize(p EndpointPolicy) (EndpointPolicy, error) {
	if p.ID == 0 {
		return p, errors.New("endpoint id 0 is reserved")
	}
	if p.IfIndex <= 0 {
		return p, fmt.Errorf("endpoint %d: invalid ifindex %d", p.ID, p.IfIndex)
	}
	if len(p.IPs) > MaxEndpointIPs {
		return p, fmt.Errorf("endpoint %d: %d addresses, at most %d", p.ID, len(p.IPs), MaxEndpointIPs)
	}
	for _, a := range p.IPs {
		if !a.IsValid() {
			return p, fmt.Errorf("endpoint %d: invalid address", p.ID)
		}
	}
	norm := func(dir string, in []PeerEntry) ([]PeerEntry, error) {
		out := make([]PeerEntry, 0, len(in))
		seen := map[netip.Prefix]bool{}
		for _, pe := range in {
			if !pe.Prefix.IsValid() {
				return nil, fmt.Errorf("endpoint %d %s: invalid prefix", p.ID, dir)
			}
			pfx := pe.Prefix
			if pfx.Addr().Is4In6() && pfx.Bits() >= 96 {
				pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
			}
			pfx = pfx.Masked()
			if seen[pfx] {
				return nil, fmt.Errorf("endpoint %d %s: prefix %s listed twice", p.ID, dir, pfx)
			}
			seen[pfx] = true
			if len(pe.Rules) > MaxRulesPerPrefix {
				return nil, fmt.Errorf("endpoint %d %s %s: %d rules, at most %d", p.ID, dir, pfx, len(pe.Rules), MaxRulesPerPrefix)
			}
			rules := make([]PortRule, len(pe.Rules))
			for i, r := range pe.Rules {
				if r.PortHi == 0 {
					r.PortHi = r.PortLo
				}
				if r.PortLo == 0 && r.PortHi != 0 {
					r.PortLo = 1
				}
				if r.PortHi < r.PortLo {
					return nil, fmt.Errorf("endpoint %d %s %s: port range %d-%d", p.ID, dir, pfx, r.PortLo, r.PortHi)
				}
				rules[i] = r
			}
			out = append(out, PeerEntry{Prefix: pfx, Rules: rules})
		}
		sortPeers(out)
		return out, nil
	}
	var err error
	if p.Ingress, err = norm("ingress", p.Ingress); err != nil {
		return p, err
	}
	if p.Egress, err = norm("egress", p.Egress); err != nil {
		return p, err
	}
	return p, nil
}

func polEntry(id uint32, dir Direction, gen uint8, pe PeerEntry) (NetpolPolKey, NetpolPolVal) {
	fam, b := addrBytes(pe.Prefix.Addr())
	k := NetpolPolKey{Prefixlen: uint32(polPrefixBase + pe.Prefix.Bits()), EpId: id, Dir: uint8(dir), Gen: gen, Family: fam, Addr: b}
	var v NetpolPolVal
	v.N = uint32(len(pe.Rules))
	for i, r := range pe.Rules {
		v.Rules[i].PolicyId = r.PolicyID
		v.Rules[i].PortLo = r.PortLo
		v.Rules[i].PortHi = r.PortHi
		v.Rules[i].Idx = r.Rule
		v.Rules[i].Proto = uint8(r.Proto)
	}
	return k, v
}

// isFull reports kernel errors that mean "map full".
func isFull(err error) bool {
	return errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM)
}

// ApplyEndpoint replaces the policy of one endpoint atomically and makes
// sure its programs are attached. The new entries go into the inactive
// generation, one update of the endpoint entry switches packets to them,
// then the old generation is deleted. Capacity is checked first: on ErrFull
// nothing is written and the old policy stays in force.
func (o *Objects) ApplyEndpoint(in EndpointPolicy) error {
	p, err := normalize(in)
	if err != nil {
		return fmt.Errorf("apply endpoint: %w", err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()

	old := o.eps[p.ID]
	for id, st := range o.eps {
		if id != p.ID && st.policy.IfIndex == p.IfIndex {
			return fmt.Errorf("apply endpoint %d: ifindex %d belongs to endpoint %d", p.ID, p.IfIndex, id)
		}
	}
	n := len(p.Ingress) + len(p.Egress)
	if free := o.opts.MaxPolicyEntries - o.polEntries; n > free {
		return fmt.Errorf("apply endpoint %d: %d policy entries, %d free of %d: %w", p.ID, n, free, o.opts.MaxPolicyEntries, ErrFull)
	}
	if old == nil && len(o.eps) >= o.opts.MaxEndpoints {
		return fmt.Errorf("apply endpoint %d: %d endpoints: %w", p.ID, o.opts.MaxEndpoints, ErrFull)
	}

	gen := uint8(0)
	if old != nil {
		gen = 1 - old.gen
	}
	keys := make([]NetpolPolKey, 0, n)
	rollback := func() {
		for _, k := range keys {
			o.objs.KebpfNpPol.Delete(k)
		}
	}
	for _, d := range []struct {
		dir   Direction
		peers []PeerEntry
	}{{Ingress, p.Ingress}, {Egress, p.Egress}} {
		for _, pe := range d.peers {
			k, v := polEntry(p.ID, d.dir, gen, pe)
			if err := o.objs.KebpfNpPol.Update(k, v, ebpf.UpdateAny); err != nil {
				rollback()
				if isFull(err) {
					err = fmt.Errorf("%w (%w)", ErrFull, err)
				}
				return fmt.Errorf("apply endpoint %d: write %s: %w", p.ID, pe.Prefix, err)
			}
			keys = append(keys, k)
		}
	}
	if err := o.ensureCounters(p.ID); err != nil {
		rollback()
		return fmt.Errorf("apply endpoint %d: %w", p.ID, err)
	}

	o.rev++
	ev := NetpolEpVal{Id: p.ID, Rev: o.rev, DenyPolicy: p.DefaultDenyPolicy, Gen: gen}
	if p.IngressEnforced {
		ev.Flags |= 1 << Ingress
	}
	if p.EgressEnforced {
		ev.Flags |= 1 << Egress
	}
	for i, a := range p.IPs {
		ev.IpFam[i], ev.Ips[i] = addrBytes(a)
	}
	ev.Nips = uint8(len(p.IPs))
	// The flip: from here packets see the new generation.
	if err := o.objs.KebpfNpEp.Update(uint32(p.IfIndex), ev, ebpf.UpdateAny); err != nil {
		rollback()
		if isFull(err) {
			err = fmt.Errorf("%w (%w)", ErrFull, err)
		}
		return fmt.Errorf("apply endpoint %d: write endpoint: %w", p.ID, err)
	}
	sortKeys(keys)
	st := &epState{policy: p, gen: gen, rev: o.rev, keys: keys}
	o.eps[p.ID] = st
	o.polEntries += len(keys)

	var errs []error
	if old != nil {
		o.deleteKeys(old.keys)
		if old.policy.IfIndex != p.IfIndex {
			// The pod's interface changed (pod sandbox restarted): the old
			// interface is gone or no longer this pod's.
			if err := o.objs.KebpfNpEp.Delete(uint32(old.policy.IfIndex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("delete old ifindex %d: %w", old.policy.IfIndex, err))
			}
			if err := o.detach(old.policy.IfIndex); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if !o.opts.noAttach {
		if err := o.attach(p.IfIndex); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("apply endpoint %d: %w", p.ID, err)
	}
	return nil
}

func (o *Objects) deleteKeys(keys []NetpolPolKey) {
	for _, k := range keys {
		if err := o.objs.KebpfNpPol.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			// Left for the next Load's rebuild to collect (it deletes
			// entries of inactive generations); counted as free already.
			o.opts.Logger.Warn("delete policy entry", "endpoint", k.EpId, "err", err)
		}
	}
	o.polEntries -= len(keys)
}

func (o *Objects) ensureCounters(id uint32) error {
	zero := make([]NetpolEpCounters, ebpf.MustPossibleCPU())
	err := o.objs.KebpfNpCnt.Update(id, zero, ebpf.UpdateNoExist)
	if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create counters: %w", err)
	}
	return nil
}

// DeleteEndpoint detaches the endpoint's programs and removes its policy,
// counters and tracked flows. Deleting an unknown endpoint is not an error.
func (o *Objects) DeleteEndpoint(id uint32) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	st := o.eps[id]
	if st == nil {
		return nil
	}
	var errs []error
	if err := o.detach(st.policy.IfIndex); err != nil {
		errs = append(errs, err)
	}
	if err := o.objs.KebpfNpEp.Delete(uint32(st.policy.IfIndex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("delete endpoint entry: %w", err))
	}
	o.deleteKeys(st.keys)
	if err := o.objs.KebpfNpCnt.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("delete counters: %w", err))
	}
	delete(o.eps, id)
	if err := o.purgeFlows(id); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete endpoint %d: %w", id, err)
	}
	return nil
}

// purgeFlows drops the flow and verdict entries of endpoint id, so a pod
// that later gets the same ID starts clean.
func (o *Objects) purgeFlows(id uint32) error {
	for _, m := range []*ebpf.Map{o.objs.KebpfNpCt, o.objs.KebpfNpVerd} {
		keys, err := mapKeys[NetpolCtKey](m)
		if err != nil {
			return fmt.Errorf("iterate flows: %w", err)
		}
		for _, k := range keys {
			if k.EpId == id {
				m.Delete(k)
			}
		}
	}
	return nil
}

// SetHostIPs replaces the node's addresses. Traffic between these and any
// pod is always allowed, so kubelet probes work under default-deny.
func (o *Objects) SetHostIPs(ips []netip.Addr) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	want := map[NetpolHostKey]bool{}
	for _, a := range ips {
		if !a.IsValid() {
			return errors.New("set host ips: invalid address")
		}
		fam, w := addrWords(a)
		want[NetpolHostKey{Family: fam, Addr: w}] = true
	}
	if len(want) > int(o.objs.KebpfNpHost.MaxEntries()) {
		return fmt.Errorf("set host ips: %d addresses, at most %d: %w", len(want), o.objs.KebpfNpHost.MaxEntries(), ErrFull)
	}
	have, err := mapKeys[NetpolHostKey](o.objs.KebpfNpHost)
	if err != nil {
		return fmt.Errorf("set host ips: read: %w", err)
	}
	var stale []NetpolHostKey
	for _, k := range have {
		if !want[k] {
			stale = append(stale, k)
		}
	}
	// Add first, then remove: a node address present before and after is
	// never missing in between.
	for k := range want {
		if err := o.objs.KebpfNpHost.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("set host ips: add %s: %w", wordsAddr(k.Family, k.Addr), err)
		}
	}
	for _, k := range stale {
		if err := o.objs.KebpfNpHost.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("set host ips: remove %s: %w", wordsAddr(k.Family, k.Addr), err)
		}
	}
	return nil
}

// HostIPs reads the node addresses back.
func (o *Objects) HostIPs() ([]netip.Addr, error) {
	keys, err := mapKeys[NetpolHostKey](o.objs.KebpfNpHost)
	if err != nil {
		return nil, fmt.Errorf("read host ips: %w", err)
	}
	var out []netip.Addr
	for _, k := range keys {
		out = append(out, wordsAddr(k.Family, k.Addr))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// mapKeys lists m's keys. A key deleted concurrently can restart the walk
// (kernel semantics of get_next_key); callers tolerate duplicates.
func mapKeys[K any](m *ebpf.Map) ([]K, error) {
	var out []K
	var prev *K
	for {
		var next K
		var err error
		if prev == nil {
			err = m.NextKey(nil, &next)
		} else {
			err = m.NextKey(prev, &next)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		out = append(out, next)
		prev = &out[len(out)-1]
		if len(out) > int(m.MaxEntries())*2 {
			return out, nil
		}
	}
}

// DirCounters are one direction's counts.
type DirCounters struct {
	Allowed uint64 // packets passed
	Denied  uint64 // packets dropped
	Flows   uint64 // new flows allowed
}

// Counters are an endpoint's counts since it was first applied, summed over CPUs.
type Counters struct {
	Ingress DirCounters
	Egress  DirCounters
}

// Counters reads endpoint id's counters.
func (o *Objects) Counters(id uint32) (Counters, error) {
	var per []NetpolEpCounters
	if err := o.objs.KebpfNpCnt.Lookup(id, &per); err != nil {
		return Counters{}, fmt.Errorf("lookup counters of endpoint %d: %w", id, err)
	}
	var c Counters
	for _, x := range per {
		c.Ingress.Allowed += x.Allow[Ingress]
		c.Ingress.Denied += x.Deny[Ingress]
		c.Ingress.Flows += x.Flows[Ingress]
		c.Egress.Allowed += x.Allow[Egress]
		c.Egress.Denied += x.Deny[Egress]
		c.Egress.Flows += x.Flows[Egress]
	}
	return c, nil
}

// Flow is a tracked or decided flow as the maps record it.
type Flow struct {
	Endpoint uint32
	Proto    Proto
	// Src/Dst are the originator and responder when the flow is tracked
	// (conntrack knows who started it), else the key's canonical order.
	Src, Dst netip.AddrPort
}

func ctFlow(k NetpolCtKey, origA bool) Flow {
	a := netip.AddrPortFrom(wordsAddr(k.Family, k.A), be16(k.Pa))
	b := netip.AddrPortFrom(wordsAddr(k.Family, k.B), be16(k.Pb))
	if !origA {
		a, b = b, a
	}
	return Flow{Endpoint: k.EpId, Proto: Proto(k.Proto), Src: a, Dst: b}
}

func be16(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

// TrackedFlow is one conntrack entry.
type TrackedFlow struct {
	Flow
	Dir      Direction // of the first packet
	PolicyID uint32
	Rule     uint16
	LastSeen time.Duration // CLOCK_MONOTONIC (bpf_ktime_get_ns)
	Closing  bool          // RST or FIN both ways seen
}

// Flows lists the conntrack entries (for tests and debugging; it walks the
// whole table).
func (o *Objects) Flows() ([]TrackedFlow, error) {
	var k NetpolCtKey
	var v NetpolCtVal
	var out []TrackedFlow
	it := o.objs.KebpfNpCt.Iterate()
	for it.Next(&k, &v) {
		out = append(out, TrackedFlow{
			Flow: ctFlow(k, v.OrigA == 1), Dir: Direction(v.OrigDir), PolicyID: v.PolicyId, Rule: v.Rule,
			LastSeen: time.Duration(v.LastSeen), Closing: v.Rst == 1 || v.FinOrig == 1 && v.FinReply == 1,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", NetpolMapKebpfNpCt, err)
	}
	return out, nil
}

// Verdict is the last decision recorded for a flow.
type Verdict struct {
	Flow     // Src/Dst in canonical order
	Dir      Direction
	Verdict  uint8 // VerdictAllow / VerdictDeny
	Reason   uint8 // Reason*
	PolicyID uint32
	Rule     uint16
	At       time.Duration // CLOCK_MONOTONIC
}

// Verdicts lists the last-verdict map (for the trace feature and tests).
func (o *Objects) Verdicts() ([]Verdict, error) {
	var k NetpolCtKey
	var v NetpolVerdictVal
	var out []Verdict
	it := o.objs.KebpfNpVerd.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Verdict{Flow: ctFlow(k, true), Dir: Direction(v.Dir), Verdict: v.Verdict, Reason: v.Reason,
			PolicyID: v.PolicyId, Rule: v.Rule, At: time.Duration(v.Ts)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", NetpolMapKebpfNpVerd, err)
	}
	return out, nil
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

// attach makes sure ifindex has both programs attached in o.mode, and only
// in that mode: the other mode's attachments (left by an agent run with
// another mode) are removed once the new ones are in place, so packets are
// never unenforced.
func (o *Objects) attach(ifindex int) error {
	progs := [2]*ebpf.Program{o.objs.KebpfNpFrom, o.objs.KebpfNpTo}
	if o.mode == AttachClsact {
		if o.filters[ifindex] {
			return nil
		}
		// Replaces the filters of an earlier process in place.
		if err := attachClsact(ifindex, progs); err != nil {
			return err
		}
		o.filters[ifindex] = true
		return o.detachLinks(ifindex)
	}
	held := o.links[ifindex]
	if held[0] != nil && held[1] != nil {
		return nil
	}
	if err := o.attachTCX(ifindex, progs); err != nil {
		return err
	}
	if err := detachClsact(ifindex); err != nil {
		return fmt.Errorf("remove clsact filters of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// attachTCX: held links are kept, pinned ones get this process's programs,
// a pin for a vanished or different interface is replaced.
func (o *Objects) attachTCX(ifindex int, progs [2]*ebpf.Program) error {
	held := o.links[ifindex]
	for i, h := range hooks {
		if held[i] != nil {
			continue
		}
		l, err := o.attachHook(ifindex, h, progs[i])
		if err != nil {
			return err
		}
		held[i] = l
		o.links[ifindex] = held
	}
	return nil
}

func (o *Objects) attachHook(ifindex int, h hook, prog *ebpf.Program) (link.Link, error) {
	pin := LinkPinPath(o.pinDir, ifindex, h.suffix)
	l, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		if sameTCX(l, ifindex, h.attach) {
			if err := l.Update(prog); err == nil {
				return l, nil
			}
		}
		// Defunct (the interface went away, the ifindex was reused) or
		// not updatable: replace it so exactly one attachment remains.
		if err := pins.DetachAndClose(l); err != nil {
			return nil, fmt.Errorf("replace pinned link %s: %w", pin, err)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	// Head: run before a chained CNI program can redirect the packet past us.
	l, err = link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: h.attach, Anchor: link.Head()})
	if err != nil {
		if errors.Is(err, link.ErrNotSupported) {
			return nil, fmt.Errorf("attach %s to ifindex %d: tcx unavailable (kernel < 6.6), use AttachClsact: %w", prog, ifindex, err)
		}
		return nil, fmt.Errorf("attach %s to ifindex %d: %w", h.suffix, ifindex, err)
	}
	if err := l.Pin(pin); err != nil {
		// Unpinned, the attachment would vanish with this process.
		l.Close()
		return nil, fmt.Errorf("pin link %s: %w", pin, err)
	}
	return l, nil
}

func sameTCX(l link.Link, ifindex int, at ebpf.AttachType) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	tcx := info.TCX()
	return tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == at
}

// detach removes ifindex's attachments: links, held or only pinned, and
// clsact filters (whatever the mode: cleanup must not depend on it). A
// vanished interface is not an error.
func (o *Objects) detach(ifindex int) error {
	errs := []error{o.detachLinks(ifindex)}
	if err := detachClsact(ifindex); err != nil {
		errs = append(errs, fmt.Errorf("detach clsact filters of ifindex %d: %w", ifindex, err))
	}
	delete(o.filters, ifindex)
	return errors.Join(errs...)
}

// detachLinks removes ifindex's tcx links, held or only pinned.
func (o *Objects) detachLinks(ifindex int) error {
	var errs []error
	held := o.links[ifindex]
	for i, h := range hooks {
		l := held[i]
		if l == nil {
			pl, err := link.LoadPinnedLink(LinkPinPath(o.pinDir, ifindex, h.suffix), nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("load pinned link %s: %w", h.suffix, err))
				continue
			}
			l = pl
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach ifindex %d %s: %w", ifindex, h.suffix, err))
		}
	}
	delete(o.links, ifindex)
	return errors.Join(errs...)
}

// Close releases this process's handles. Pinned links and maps stay, so
// enforcement continues while the agent restarts; use Detach to remove it.
func (o *Objects) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var errs []error
	for ifindex, held := range o.links {
		for _, l := range held {
			if l != nil {
				if err := l.Close(); err != nil {
					errs = append(errs, fmt.Errorf("close link: %w", err))
				}
			}
		}
		delete(o.links, ifindex)
	}
	// Filters hold their program themselves: nothing to release.
	clear(o.filters)
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// Detach removes enforcement from every interface and deletes all state:
// links, clsact filters (those of every interface in the caller's network
// namespace), map pins, maps. Established connections keep flowing (nothing
// drops once the programs are gone). This is `disable policy`.
func (o *Objects) Detach() error {
	o.mu.Lock()
	var errs []error
	for ifindex := range o.links {
		if err := o.detachLinks(ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	clear(o.filters)
	o.mu.Unlock()
	if err := detachPinnedLinks(o.pinDir); err != nil {
		errs = append(errs, err)
	}
	if !o.opts.noAttach {
		if err := detachAllClsact(); err != nil {
			errs = append(errs, fmt.Errorf("detach clsact filters: %w", err))
		}
	}
	for _, m := range []*ebpf.Map{o.objs.KebpfNpEp, o.objs.KebpfNpPol, o.objs.KebpfNpCt, o.objs.KebpfNpHost,
		o.objs.KebpfNpCnt, o.objs.KebpfNpVerd, o.objs.KebpfNpEvents} {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", m, err))
		}
	}
	o.mu.Lock()
	o.eps = map[uint32]*epState{}
	o.polEntries = 0
	o.mu.Unlock()
	if err := o.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close objects: %w", err))
	}
	return errors.Join(errs...)
}

// DetachPinned removes every netpol link and map pin under pinDir, and
// every netpol clsact filter (TCA_BPF_NAME kebpf_np_*) on the interfaces of
// the caller's network namespace, without loading anything (the agent's
// `cleanup`). Clsact qdiscs stay. Missing pins are not an error.
func DetachPinned(pinDir string) error {
	var errs []error
	if err := detachAllClsact(); err != nil {
		errs = append(errs, fmt.Errorf("detach clsact filters: %w", err))
	}
	return errors.Join(append(errs, detachPinnedLinks(pinDir), pins.RemoveFiles(MapPinPaths(pinDir)))...)
}

func detachPinnedLinks(pinDir string) error {
	dir := filepath.Join(pinDir, "links")
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	var errs []error
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), LinkPinPrefix) {
			continue
		}
		pin := filepath.Join(dir, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			// Not a link we can load: at least drop the pin.
			if rerr := os.Remove(pin); rerr != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", pin, rerr))
			}
			continue
		}
		if err := pins.DetachAndClose(l); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
		}
	}
	return errors.Join(errs...)
}
