//go:build linux

package socklb

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
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

// Stats are verdicts of connect/sendmsg since the stats map was pinned.
type Stats struct {
	Translated uint64
	Refused    uint64
	Passed     uint64
}

// Stats sums the per-CPU verdict counters.
func (o *Objects) Stats() (Stats, error) {
	sums, err := pins.SumPerCPU(o.objs.KebpfLbStats, SocklbMapKebpfLbStats, int(statMax))
	if err != nil {
		return Stats{}, err
	}
	return Stats{Translated: sums[statTranslated], Refused: sums[statRefused], Passed: sums[statPassed]}, nil
}

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
