package pins

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Policy is what an agent upgrade does with a pinned map whose layout (type,
// key or value size, max_entries, flags) no longer matches the new
// program's. The kernel cannot change a map's layout, and cilium/ebpf
// refuses to load a program with an incompatible pin (ErrMapIncompatible):
// without a policy the agent would not start, and flushing the pins would
// drop the node's datapath state.
type Policy uint8

const (
	// Migrate copies every entry (converted) into a new map before the new
	// programs load. For maps only the agent writes (policy, services):
	// nothing changes them between the copy and the link switch.
	Migrate Policy = iota + 1
	// MigrateCatchUp is Migrate plus a second pass after the new programs
	// replaced the old ones on the links (Migration.Finish): entries the
	// old programs created meanwhile (new flows in a conntrack table) are
	// copied when the new map lacks them. Keys the first pass copied are
	// not copied again: the new map's value is the copy or, newer, what the
	// new programs wrote (the old programs' updates in between are lost),
	// and a copied key now missing was deleted or evicted there.
	MigrateCatchUp
	// Recreate starts the map empty; the state is lost, and logged so. For
	// maps that cannot be copied (ring buffers cannot be iterated, a
	// sockhash reads back socket cookies where an update needs fds) or
	// whose loss is harmless (caches the datapath refills).
	Recreate
)

func (p Policy) String() string {
	switch p {
	case Migrate:
		return "migrate"
	case MigrateCatchUp:
		return "migrate+catch-up"
	case Recreate:
		return "recreate-empty"
	}
	return fmt.Sprintf("policy(%d)", uint8(p))
}

// Upgrade converts the entries of a pinned map from an earlier layout
// version. A pinned map carries no version: the version is recognised by
// its key and value sizes, so a layout change must change one of them (a
// field reinterpreted in place needs a resized struct or a new map name).
type Upgrade struct {
	From      int    // layout version converted from
	KeySize   uint32 // key size of version From
	ValueSize uint32 // value size of version From (per CPU for per-CPU maps)
	// Key and Value convert one old key or value to the current layout;
	// nil keeps it as is (the size must then be unchanged). For per-CPU
	// maps Value converts each CPU's value.
	Key   func(old []byte) ([]byte, error)
	Value func(old []byte) ([]byte, error)
}

// VersionedMap is one pinned map's upgrade contract: its layout version and
// what an upgrade does with it.
type VersionedMap struct {
	Name string
	// Version is the layout version of the map's key and value; bump it,
	// and add an Upgrade from the previous one, when either struct changes.
	// A max_entries or flags change (a size option) needs neither: the
	// entries are copied as they are.
	Version int
	Policy  Policy
	// Why the policy is right for this map (logged when state is dropped).
	Why      string
	Upgrades []Upgrade
}

// tempSuffix names the pin a migrated map gets before it is renamed over
// the old one. bpffs refuses names with a dot; no map name ends this way.
const tempSuffix = "__migrating"

// TempPin is where the replacement of the map pinned at pin is pinned until
// the rename.
func TempPin(pin string) string { return pin + tempSuffix }

// Migration holds the maps replaced by MigrateMaps: the old ones stay open
// until Finish, because the old programs keep writing them until the new
// programs take over the links.
type Migration struct {
	log  *slog.Logger
	maps []*migrated
}

type migrated struct {
	vm       VersionedMap
	spec     *ebpf.MapSpec
	pin      string
	up       *Upgrade // nil: the key and value layout is unchanged
	from, to string   // layouts, for the log
	old, new *ebpf.Map
	copied   int
	evicted  int // copied entries an LRU map evicted during the copy
	// copiedKeys are the old map's keys the first pass copied (the
	// catch-up skips them).
	copiedKeys map[string]struct{}
	renamed    bool
}

// layout describes m's layout for logs.
func layout(version int, typ ebpf.MapType, k, v, max, flags uint32) string {
	ver := "v?"
	if version > 0 {
		ver = fmt.Sprintf("v%d", version)
	}
	return fmt.Sprintf("%s %s key=%d value=%d max_entries=%d flags=%#x", ver, typ, k, v, max, flags)
}

// uncopyable map types: their entries cannot be read back as written (ring
// buffers and perf arrays cannot be iterated; socket maps return cookies,
// program and map-in-map arrays return IDs, where an update needs fds).
func uncopyable(t ebpf.MapType) bool {
	switch t {
	case ebpf.RingBuf, ebpf.PerfEventArray, ebpf.SockMap, ebpf.SockHash, ebpf.ProgramArray,
		ebpf.ArrayOfMaps, ebpf.HashOfMaps, ebpf.UserRingbuf:
		return true
	}
	return false
}

// MigrateMaps makes every pinned map of spec (PinByName, under pinPath)
// compatible with spec before the collection is loaded, following table:
// an incompatible pin is replaced by a new map holding its entries (or
// empty, per Policy), pinned at a temporary name and renamed over the old
// pin (rename(2) on bpffs replaces atomically: a concurrent opener sees
// the old map or the new one, never no map). The caller loads spec as
// before, then calls Finish once its links run the new programs; on a
// failed load it calls Abort, which puts the old maps back.
//
// Everything is checked before a pin is touched: a pinned map with no table
// entry, an unknown old layout or more entries than the new max_entries
// fails the whole migration, the old pins untouched. Temporary pins a
// crashed migration left are removed first (their old pins were never
// replaced, so the migration simply runs again). Two loaders must not
// migrate the same map at once (the shared L7 maps are in two specs): the
// agent enables its features one at a time.
func MigrateMaps(spec *ebpf.CollectionSpec, pinPath string, table []VersionedMap, log *slog.Logger) (*Migration, error) {
	if log == nil {
		log = slog.Default()
	}
	mg := &Migration{log: log}
	if err := removeTempPins(spec, pinPath); err != nil {
		return nil, err
	}
	byName := map[string]VersionedMap{}
	for _, vm := range table {
		byName[vm.Name] = vm
	}
	for _, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		pin := filepath.Join(pinPath, ms.Name)
		old, err := ebpf.LoadPinnedMap(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			mg.closeAll()
			return nil, fmt.Errorf("load pinned map %s: %w", pin, err)
		}
		cerr := ms.Compatible(old)
		if cerr == nil {
			old.Close()
			continue
		}
		if !errors.Is(cerr, ebpf.ErrMapIncompatible) {
			old.Close()
			mg.closeAll()
			return nil, fmt.Errorf("check pinned map %s: %w", ms.Name, cerr)
		}
		m, err := plan(ms, old, pin, byName)
		if err != nil {
			old.Close()
			mg.closeAll()
			return nil, err
		}
		mg.maps = append(mg.maps, m)
	}
	if len(mg.maps) == 0 {
		return mg, nil
	}
	for _, m := range mg.maps {
		if err := m.build(); err != nil {
			// Only temporary pins exist so far: drop them, keep the old.
			err = errors.Join(err, mg.rollback())
			mg.closeAll()
			return nil, err
		}
	}
	for _, m := range mg.maps {
		if err := os.Rename(TempPin(m.pin), m.pin); err != nil {
			err = errors.Join(fmt.Errorf("replace pinned map %s: %w", m.pin, err), mg.rollback())
			mg.closeAll()
			return nil, err
		}
		m.renamed = true
	}
	for _, m := range mg.maps {
		if m.vm.Policy == Recreate {
			log.Warn("pinned map recreated empty after a layout change: its state is lost",
				"map", m.vm.Name, "from", m.from, "to", m.to, "entries_lost", m.copied, "why", m.vm.Why)
		}
	}
	return mg, nil
}

// plan checks that the map pinned at pin (old) can become one of spec ms
// under its table entry, without changing anything.
func plan(ms *ebpf.MapSpec, old *ebpf.Map, pin string, table map[string]VersionedMap) (*migrated, error) {
	vm, ok := table[ms.Name]
	if !ok {
		return nil, fmt.Errorf("pinned map %s changed layout and has no migration policy (add it to the loader's versioned map table)", ms.Name)
	}
	m := &migrated{vm: vm, spec: ms, pin: pin, old: old}
	fromVersion := vm.Version
	if old.KeySize() != ms.KeySize || old.ValueSize() != ms.ValueSize {
		for i := range vm.Upgrades {
			if u := &vm.Upgrades[i]; u.KeySize == old.KeySize() && u.ValueSize == old.ValueSize() {
				m.up, fromVersion = u, u.From
				break
			}
		}
		if m.up == nil {
			fromVersion = 0 // an older layout this table does not know
		}
		if m.up == nil && vm.Policy != Recreate {
			return nil, fmt.Errorf("pinned map %s: key/value size %d/%d changed to %d/%d with no upgrade from that layout; refusing to drop its state",
				ms.Name, old.KeySize(), old.ValueSize(), ms.KeySize, ms.ValueSize)
		}
	}
	m.from = layout(fromVersion, old.Type(), old.KeySize(), old.ValueSize(), old.MaxEntries(), old.Flags())
	m.to = layout(vm.Version, ms.Type, ms.KeySize, ms.ValueSize, ms.MaxEntries, ms.Flags)
	if vm.Policy == Recreate {
		return m, nil
	}
	if uncopyable(old.Type()) || uncopyable(ms.Type) {
		return nil, fmt.Errorf("pinned map %s: %s entries cannot be copied to %s; its policy must be %s", ms.Name, old.Type(), ms.Type, Recreate)
	}
	n, err := countEntries(old, ms.MaxEntries)
	if err != nil {
		return nil, fmt.Errorf("pinned map %s: %w", ms.Name, err)
	}
	if n > int(ms.MaxEntries) {
		return nil, fmt.Errorf("pinned map %s holds %d entries, more than the new max_entries %d: refusing to drop any; raise the size or drain the map (the old map stays pinned, untouched)",
			ms.Name, n, ms.MaxEntries)
	}
	return m, nil
}

// countEntries counts old's entries as a copy into a map of max entries
// would need them. An array always holds max_entries entries, so only the
// non-zero ones past the new size count as overflow.
func countEntries(old *ebpf.Map, max uint32) (int, error) {
	if isArray(old.Type()) {
		n := int(min(old.MaxEntries(), max))
		for i := max; i < old.MaxEntries(); i++ {
			k := binary.NativeEndian.AppendUint32(nil, i)
			vals, err := lookupValues(old, k)
			if err != nil {
				return 0, err
			}
			for _, v := range vals {
				if !allZero(v) {
					n++
					break
				}
			}
		}
		return n, nil
	}
	n := 0
	err := eachKey(old, func([]byte) error { n++; return nil })
	return n, err
}

func isArray(t ebpf.MapType) bool { return t == ebpf.Array || t == ebpf.PerCPUArray }

func lru(t ebpf.MapType) bool { return t == ebpf.LRUHash || t == ebpf.LRUCPUHash }

// perCPU map types: a lookup returns one value per possible CPU.
func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}

func allZero(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }

// eachKey calls fn once with every key of m. get_next_key of a key the
// datapath deleted meanwhile restarts at the first key (hash maps, LPM
// tries): keys already seen are skipped, and a walk that keeps restarting
// (heavy churn) gives up with an error rather than a partial copy.
func eachKey(m *ebpf.Map, fn func([]byte) error) error {
	seen := map[string]struct{}{}
	// An untyped nil asks for the first key; a nil []byte would not.
	var cur any
	for range 4*int(m.MaxEntries()) + 16 {
		next, err := m.NextKeyBytes(cur)
		if err != nil {
			return fmt.Errorf("list keys: %w", err)
		}
		if next == nil {
			return nil
		}
		cur = next
		if _, ok := seen[string(next)]; ok {
			continue
		}
		seen[string(next)] = struct{}{}
		if err := fn(next); err != nil {
			return err
		}
	}
	return fmt.Errorf("list keys: the map changed too fast to walk (%d keys seen)", len(seen))
}

// lookupValues reads key's value: one slice, or one per CPU.
func lookupValues(m *ebpf.Map, key []byte) ([][]byte, error) {
	if perCPU(m.Type()) {
		var vals [][]byte
		err := m.Lookup(key, &vals)
		return vals, err
	}
	var v []byte
	err := m.Lookup(key, &v)
	return [][]byte{v}, err
}

func updateValues(m *ebpf.Map, key []byte, vals [][]byte, flags ebpf.MapUpdateFlags) error {
	if perCPU(m.Type()) {
		return m.Update(key, vals, flags)
	}
	return m.Update(key, vals[0], flags)
}

// build creates the replacement map (unpinned), fills it and pins it at the
// temporary name.
func (m *migrated) build() error {
	ms := m.spec
	ns := ms.Copy()
	// Pinned by us at the temporary name, then renamed: NewMap must not
	// look at (or pin to) the real path.
	ns.Pinning = ebpf.PinNone
	nm, err := ebpf.NewMap(ns)
	if err != nil {
		return fmt.Errorf("create %s with the new layout: %w", ms.Name, err)
	}
	m.new = nm
	if m.vm.Policy == Recreate {
		// For the log: how much state is dropped (ring buffers: unknown;
		// socket maps list their keys).
		if t := m.old.Type(); t != ebpf.RingBuf && t != ebpf.UserRingbuf {
			n, _ := countEntries(m.old, m.old.MaxEntries())
			m.copied = n
		}
	} else {
		n, err := m.copy(ebpf.UpdateAny)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", ms.Name, err)
		}
		m.copied = n
		if lru(nm.Type()) {
			// An LRU map evicts before it is full (a CPU refills its
			// free list in batches and shrinks the list when the batch
			// is short), so a copy close to max_entries may lose
			// entries: count them, and say so.
			have, err := countEntries(nm, nm.MaxEntries())
			if err != nil {
				return fmt.Errorf("migrate %s: %w", ms.Name, err)
			}
			m.evicted = max(0, n-have)
		}
	}
	if err := nm.Pin(TempPin(m.pin)); err != nil {
		return fmt.Errorf("pin %s: %w", TempPin(m.pin), err)
	}
	return nil
}

// copy copies the old map's entries, converted, into the new one and
// returns how many it wrote. The first pass (UpdateAny) records the keys it
// copied; the catch-up (UpdateNoExist) copies only keys the first pass did
// not see, that the new map lacks: entries the old programs created since.
// A copied key now missing was deleted by the new programs or evicted by
// the LRU; bringing it back would resurrect a closed flow or, near
// capacity, evict the next one in line (LRU order is copy order).
func (m *migrated) copy(flags ebpf.MapUpdateFlags) (int, error) {
	n := 0
	array := isArray(m.new.Type())
	catchUp := flags == ebpf.UpdateNoExist
	if !catchUp {
		m.copiedKeys = map[string]struct{}{}
	}
	err := eachKey(m.old, func(k []byte) error {
		if catchUp {
			if _, ok := m.copiedKeys[string(k)]; ok {
				return nil
			}
		}
		oldKey := string(k)
		vals, err := lookupValues(m.old, k)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // deleted by the datapath meanwhile
		}
		if err != nil {
			return fmt.Errorf("lookup: %w", err)
		}
		if array {
			if binary.NativeEndian.Uint32(k) >= m.new.MaxEntries() {
				return nil // zero: countEntries refused the others
			}
			if flags == ebpf.UpdateNoExist {
				return nil // array slots always exist
			}
		}
		if m.up != nil {
			if m.up.Key != nil {
				if k, err = m.up.Key(k); err != nil {
					return fmt.Errorf("convert key: %w", err)
				}
			}
			if m.up.Value != nil {
				for i := range vals {
					if vals[i], err = m.up.Value(vals[i]); err != nil {
						return fmt.Errorf("convert value: %w", err)
					}
				}
			}
		}
		// A converter that does not produce the spec's sizes is a bug of
		// the table (the upgrade is for another version): refuse.
		if len(k) != int(m.new.KeySize()) || len(vals[0]) != int(m.new.ValueSize()) {
			return fmt.Errorf("converted entry is %d/%d bytes, the map's key/value are %d/%d (upgrade from v%d does not produce v%d)",
				len(k), len(vals[0]), m.new.KeySize(), m.new.ValueSize(), m.upFrom(), m.vm.Version)
		}
		if err := updateValues(m.new, k, vals, flags); err != nil {
			if flags == ebpf.UpdateNoExist && errors.Is(err, ebpf.ErrKeyExist) {
				return nil
			}
			return fmt.Errorf("update: %w", err)
		}
		if !catchUp {
			m.copiedKeys[oldKey] = struct{}{}
		}
		n++
		return nil
	})
	return n, err
}

func (m *migrated) upFrom() int {
	if m.up == nil {
		return m.vm.Version
	}
	return m.up.From
}

// Finish runs after the new programs replaced the old ones on every link:
// MigrateCatchUp maps get the entries the old programs added since the
// copy, then the old maps are closed (the kernel frees each once the last
// old program holding it is gone). It logs one line per migrated map.
func (mg *Migration) Finish() error {
	if mg == nil {
		return nil
	}
	var errs []error
	for _, m := range mg.maps {
		if m.vm.Policy == Recreate {
			continue
		}
		catchUp := 0
		if m.vm.Policy == MigrateCatchUp {
			n, err := m.copy(ebpf.UpdateNoExist)
			if err != nil {
				errs = append(errs, fmt.Errorf("catch up %s: %w", m.vm.Name, err))
			}
			catchUp = n
		}
		level := slog.LevelInfo
		if m.evicted > 0 {
			level = slog.LevelWarn
		}
		mg.log.Log(context.Background(), level, "pinned map migrated to a new layout", "map", m.vm.Name, "policy", m.vm.Policy,
			"from", m.from, "to", m.to, "copied", m.copied, "catch_up", catchUp, "evicted_by_lru", m.evicted)
	}
	mg.closeAll()
	return errors.Join(errs...)
}

// Abort undoes MigrateMaps after a failed load: the old maps are pinned
// back under their names (the old programs still use them, and the next
// attempt migrates again from them).
func (mg *Migration) Abort() error {
	if mg == nil {
		return nil
	}
	err := mg.rollback()
	mg.closeAll()
	return err
}

// rollback re-pins every renamed old map over its replacement and removes
// the temporary pins not renamed yet.
func (mg *Migration) rollback() error {
	var errs []error
	for _, m := range mg.maps {
		tmp := TempPin(m.pin)
		if !m.renamed {
			if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove %s: %w", tmp, err))
			}
			continue
		}
		// A handle from LoadPinnedMap remembers its pin path, and Pin on
		// it would move that pin (now the new map's) instead: pin a clone.
		h, err := m.old.Clone()
		if err == nil {
			err = h.Pin(tmp)
			h.Close()
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("re-pin old %s: %w", m.vm.Name, err))
			continue
		}
		if err := os.Rename(tmp, m.pin); err != nil {
			os.Remove(tmp)
			errs = append(errs, fmt.Errorf("restore %s: %w", m.pin, err))
			continue
		}
		m.renamed = false
	}
	return errors.Join(errs...)
}

func (mg *Migration) closeAll() {
	for _, m := range mg.maps {
		m.old.Close()
		if m.new != nil {
			m.new.Close()
		}
		// A map object closed after Pin still has a pinned path recorded;
		// the pin itself is what the kernel keeps.
	}
	mg.maps = nil
}

// Migrated lists the names of the maps MigrateMaps replaced.
func (mg *Migration) Migrated() []string {
	if mg == nil {
		return nil
	}
	names := make([]string, len(mg.maps))
	for i, m := range mg.maps {
		names[i] = m.vm.Name
	}
	return names
}

// removeTempPins removes the temporary pins of spec's maps that a
// migration interrupted before its rename left in dir. Only this spec's:
// the map directory is shared, and another package may be migrating its
// own maps at the same moment.
func removeTempPins(spec *ebpf.CollectionSpec, dir string) error {
	var errs []error
	for _, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		tmp := TempPin(filepath.Join(dir, ms.Name))
		if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove leftover %s: %w", tmp, err))
		}
	}
	return errors.Join(errs...)
}

// CheckTable reports pinned maps of spec without an entry in table, entries
// naming no pinned map of spec, and incomplete entries: a loader's table
// must state a policy for every map it pins (for the loaders' unit tests).
func CheckTable(spec *ebpf.CollectionSpec, table []VersionedMap) error {
	var errs []error
	listed := map[string]bool{}
	for _, vm := range table {
		if listed[vm.Name] {
			errs = append(errs, fmt.Errorf("%s listed twice", vm.Name))
		}
		listed[vm.Name] = true
		if vm.Policy < Migrate || vm.Policy > Recreate || vm.Version < 1 || vm.Why == "" {
			errs = append(errs, fmt.Errorf("%s: incomplete entry (policy, version >= 1 and why are required)", vm.Name))
		}
		ms, ok := spec.Maps[vm.Name]
		if !ok || ms.Pinning != ebpf.PinByName {
			errs = append(errs, fmt.Errorf("%s: not a pinned map of the program", vm.Name))
			continue
		}
		if vm.Policy != Recreate && uncopyable(ms.Type) {
			errs = append(errs, fmt.Errorf("%s: %s entries cannot be copied; its policy must be %s", vm.Name, ms.Type, Recreate))
		}
		for _, u := range vm.Upgrades {
			if u.From >= vm.Version {
				errs = append(errs, fmt.Errorf("%s: upgrade from v%d is not older than v%d", vm.Name, u.From, vm.Version))
			}
		}
	}
	for name, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName && !listed[name] {
			errs = append(errs, fmt.Errorf("pinned map %s has no migration policy", name))
		}
	}
	return errors.Join(errs...)
}
