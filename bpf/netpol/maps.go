//go:build linux

package netpol

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

const (
	fam4 uint8 = 4
	fam6 uint8 = 6
	// polPrefixBase is the number of LPM key bits before the address:
	// ep_id (32) + dir (8) + gen (8) + family (8) + pad (8).
	polPrefixBase = 64
)

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
	if err := o.setPodIPs(p, old); err != nil {
		errs = append(errs, err)
	}
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
	for _, a := range st.policy.IPs {
		if err := o.deletePodIP(a, st.policy.IfIndex); err != nil {
			errs = append(errs, err)
		}
	}
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
	want := map[NetpolAddrKey]bool{}
	for _, a := range ips {
		if !a.IsValid() {
			return errors.New("set host ips: invalid address")
		}
		want[addrKey(a)] = true
	}
	if len(want) > int(o.objs.KebpfNpHost.MaxEntries()) {
		return fmt.Errorf("set host ips: %d addresses, at most %d: %w", len(want), o.objs.KebpfNpHost.MaxEntries(), ErrFull)
	}
	have, err := mapKeys[NetpolAddrKey](o.objs.KebpfNpHost)
	if err != nil {
		return fmt.Errorf("set host ips: read: %w", err)
	}
	var stale []NetpolAddrKey
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

// addrKey is a's key in kebpf_np_host and kebpf_np_ip.
func addrKey(a netip.Addr) NetpolAddrKey {
	fam, w := addrWords(a)
	return NetpolAddrKey{Family: fam, Addr: w}
}

// setPodIPs points p's addresses at its interface in kebpf_np_ip (the L7
// checks find a steered connection's destination endpoint by pod IP) and
// drops the addresses old had and p no longer has.
func (o *Objects) setPodIPs(p EndpointPolicy, old *epState) error {
	var errs []error
	for _, a := range p.IPs {
		if err := o.objs.KebpfNpIp.Update(addrKey(a), uint32(p.IfIndex), ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("write pod ip %s: %w", a, err))
		}
	}
	if old != nil {
		for _, a := range old.policy.IPs {
			if !slices.Contains(p.IPs, a) || old.policy.IfIndex != p.IfIndex {
				if err := o.deletePodIP(a, old.policy.IfIndex); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// deletePodIP removes a from kebpf_np_ip if it still points at ifindex
// (a reused address may belong to a newer endpoint by now).
func (o *Objects) deletePodIP(a netip.Addr, ifindex int) error {
	k := addrKey(a)
	var cur uint32
	err := o.objs.KebpfNpIp.Lookup(k, &cur)
	if errors.Is(err, ebpf.ErrKeyNotExist) || err == nil && cur != uint32(ifindex) {
		return nil
	}
	if err == nil {
		err = o.objs.KebpfNpIp.Delete(k)
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete pod ip %s: %w", a, err)
	}
	return nil
}

// syncPodIPs makes kebpf_np_ip match the endpoints read back at Load (maps
// pinned by an agent that predates it, or left by an interrupted apply).
func (o *Objects) syncPodIPs() error {
	want := map[NetpolAddrKey]uint32{}
	for _, st := range o.eps {
		for _, a := range st.policy.IPs {
			want[addrKey(a)] = uint32(st.policy.IfIndex)
		}
	}
	have, err := o.readPodIPs()
	if err != nil {
		return err
	}
	for k, v := range have {
		if w, ok := want[k]; !ok || w != v {
			if err := o.objs.KebpfNpIp.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete stale pod ip: %w", err)
			}
		}
	}
	for k, v := range want {
		if err := o.objs.KebpfNpIp.Update(k, v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write pod ip %s: %w", wordsAddr(k.Family, k.Addr), err)
		}
	}
	return nil
}

func (o *Objects) readPodIPs() (map[NetpolAddrKey]uint32, error) {
	type entry struct {
		k NetpolAddrKey
		v uint32
	}
	es, err := readAll(o.objs.KebpfNpIp, NetpolMapKebpfNpIp, func(k NetpolAddrKey, v uint32) entry { return entry{k, v} })
	out := make(map[NetpolAddrKey]uint32, len(es))
	for _, e := range es {
		out[e.k] = e.v
	}
	return out, err
}

// PodIPs reads kebpf_np_ip back: every endpoint address and the host-side
// ifindex of its endpoint (what the L7 checks use to find a steered
// connection's destination endpoint).
func (o *Objects) PodIPs() (map[netip.Addr]int, error) {
	have, err := o.readPodIPs()
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Addr]int, len(have))
	for k, v := range have {
		out[wordsAddr(k.Family, k.Addr)] = int(v)
	}
	return out, nil
}

// HostIPs reads the node addresses back.
func (o *Objects) HostIPs() ([]netip.Addr, error) {
	keys, err := mapKeys[NetpolAddrKey](o.objs.KebpfNpHost)
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

func be16(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}
