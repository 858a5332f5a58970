//go:build linux

package pins

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// Synthetic maps: kebpf_t_ct stands for a conntrack table (LRU, written by
// programs: catch-up), kebpf_t_cnt for per-CPU counters, kebpf_t_ev for a
// ring buffer.
const (
	ctName  = "kebpf_t_ct"
	cntName = "kebpf_t_cnt"
	evName  = "kebpf_t_ev"
)

// v1 value of kebpf_t_ct: a u64; v2 appends a u64 (42 for migrated entries).
func spec(ctMax, ctValue, cntMax, evBytes uint32) *ebpf.CollectionSpec {
	return &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{
		ctName:  {Name: ctName, Type: ebpf.LRUHash, KeySize: 4, ValueSize: ctValue, MaxEntries: ctMax, Pinning: ebpf.PinByName},
		cntName: {Name: cntName, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: cntMax, Pinning: ebpf.PinByName},
		evName:  {Name: evName, Type: ebpf.RingBuf, MaxEntries: evBytes, Pinning: ebpf.PinByName},
	}}
}

func table() []VersionedMap {
	return []VersionedMap{
		{Name: ctName, Version: 2, Policy: MigrateCatchUp, Why: "flows",
			Upgrades: []Upgrade{{From: 1, KeySize: 4, ValueSize: 8, Value: func(old []byte) ([]byte, error) {
				return binary.NativeEndian.AppendUint64(bytes.Clone(old), 42), nil
			}}}},
		{Name: cntName, Version: 1, Policy: Migrate, Why: "counters"},
		{Name: evName, Version: 1, Policy: Recreate, Why: "ring buffers cannot be iterated: events in flight are lost"},
	}
}

// load loads spec's maps from the pins under dir, as a loader would.
func load(t *testing.T, spec *ebpf.CollectionSpec, dir string) *ebpf.Collection {
	t.Helper()
	c, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func pinnedID(t *testing.T, pin string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return bpftest.MapID(t, m)
}

// fill writes n flows (key i, value i*10) and counter slots (slot i = i+1
// on every CPU).
func fill(t *testing.T, c *ebpf.Collection, n int) {
	t.Helper()
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	for i := range uint32(n) {
		if err := c.Maps[ctName].Update(i, uint64(i)*10, ebpf.UpdateNoExist); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.Maps[cntName].MaxEntries() {
		vals := make([]uint64, cpus)
		for j := range vals {
			vals[j] = uint64(i + 1)
		}
		if err := c.Maps[cntName].Update(i, vals, ebpf.UpdateExist); err != nil {
			t.Fatal(err)
		}
	}
}

func noTempPins(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), tempSuffix) {
			t.Errorf("temporary pin %s left behind", e.Name())
		}
	}
}

func logTo(buf *bytes.Buffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, nil))
}

// A size option grows (max_entries of the LRU and the per-CPU array): every
// entry is kept at the same pin path, in a new map, and the old map is
// freed once the migration finishes. The ring buffer, resized, restarts
// empty with a warning.
func TestMigrateGrow(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	v1 := load(t, spec(16, 8, 4, 4096), dir)
	fill(t, v1, 10)
	oldCT, oldEv := bpftest.MapID(t, v1.Maps[ctName]), bpftest.MapID(t, v1.Maps[evName])
	v1.Close()

	var logs bytes.Buffer
	v2spec := spec(64, 8, 8, 8192)
	mg, err := MigrateMaps(v2spec, dir, table(), logTo(&logs))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(mg.Migrated(), ","); !strings.Contains(got, ctName) || !strings.Contains(got, cntName) || !strings.Contains(got, evName) {
		t.Errorf("migrated %q, want all three", got)
	}
	if id := pinnedID(t, filepath.Join(dir, ctName)); id == oldCT {
		t.Fatalf("pin %s still holds the old map %d after the rename", ctName, id)
	}
	v2 := load(t, v2spec, dir)
	if err := mg.Finish(); err != nil {
		t.Fatal(err)
	}
	ct := v2.Maps[ctName]
	if ct.MaxEntries() != 64 {
		t.Fatalf("max_entries %d, want 64", ct.MaxEntries())
	}
	for i := range uint32(10) {
		var v uint64
		if err := ct.Lookup(i, &v); err != nil || v != uint64(i)*10 {
			t.Errorf("flow %d: %d, %v; want %d", i, v, err, i*10)
		}
	}
	sums, err := SumPerCPU(v2.Maps[cntName], cntName, 8)
	if err != nil {
		t.Fatal(err)
	}
	cpus, _ := ebpf.PossibleCPU()
	for i, s := range sums {
		want := uint64(0)
		if i < 4 {
			want = uint64(i+1) * uint64(cpus)
		}
		if s != want {
			t.Errorf("counter %d: %d, want %d", i, s, want)
		}
	}
	bpftest.WaitMapFreed(t, "map", oldCT)
	bpftest.WaitMapFreed(t, "map", oldEv)
	noTempPins(t, dir)
	for _, want := range []string{
		`msg="pinned map migrated to a new layout" map=` + ctName + " policy=migrate+catch-up",
		"from=\"v2 LRUHash key=4 value=8 max_entries=16",
		"to=\"v2 LRUHash key=4 value=8 max_entries=64",
		"copied=10 catch_up=0 evicted_by_lru=0",
		`msg="pinned map recreated empty after a layout change: its state is lost" map=` + evName,
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	t.Logf("logs:\n%s", logs.String())

	// Loading again with the same spec migrates nothing.
	mg, err = MigrateMaps(v2spec, dir, table(), logTo(&logs))
	if err != nil || len(mg.Migrated()) != 0 {
		t.Fatalf("second migration: %v, %v", mg.Migrated(), err)
	}
}

// A bigger value struct (v1 -> v2) goes through the registered upgrade;
// the catch-up copies what the old programs added after the copy and
// leaves alone what the new programs wrote.
func TestMigrateConvertAndCatchUp(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	v1 := load(t, spec(16, 8, 4, 4096), dir)
	fill(t, v1, 5)
	// Stands for the old programs, which keep their map until the links
	// switch.
	oldCT := v1.Maps[ctName]

	var logs bytes.Buffer
	v2spec := spec(16, 16, 4, 4096)
	mg, err := MigrateMaps(v2spec, dir, table(), logTo(&logs))
	if err != nil {
		t.Fatal(err)
	}
	v2 := load(t, v2spec, dir)
	ct := v2.Maps[ctName]
	type v2val struct{ N, Extra uint64 }
	for i := range uint32(5) {
		var v v2val
		if err := ct.Lookup(i, &v); err != nil || v != (v2val{uint64(i) * 10, 42}) {
			t.Errorf("flow %d: %+v, %v; want {%d 42}", i, v, err, i*10)
		}
	}
	// Between the copy and the link switch: the old programs open flow 7
	// and update flow 1; the new ones (already on some link) write flow 1.
	if err := oldCT.Update(uint32(7), uint64(70), ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
	if err := oldCT.Update(uint32(1), uint64(11), ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	if err := ct.Update(uint32(1), v2val{12, 1}, ebpf.UpdateExist); err != nil {
		t.Fatal(err)
	}
	if err := mg.Finish(); err != nil {
		t.Fatal(err)
	}
	var v v2val
	if err := ct.Lookup(uint32(7), &v); err != nil || v != (v2val{70, 42}) {
		t.Errorf("caught-up flow 7: %+v, %v; want {70 42}", v, err)
	}
	if err := ct.Lookup(uint32(1), &v); err != nil || v != (v2val{12, 1}) {
		t.Errorf("flow 1: %+v, %v; the new map's value must win", v, err)
	}
	if !strings.Contains(logs.String(), "from=\"v1 LRUHash key=4 value=8 max_entries=16 flags=0x0\" to=\"v2 LRUHash key=4 value=16") ||
		!strings.Contains(logs.String(), "copied=5 catch_up=1") {
		t.Errorf("log:\n%s", logs.String())
	}
	noTempPins(t, dir)
}

// Shrinking below the live entry count fails naming the map and the
// counts; nothing is replaced. A changed layout with no upgrade (and no
// Recreate policy) or no table entry fails the same way.
func TestMigrateRefuses(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	v1 := load(t, spec(16, 8, 4, 4096), dir)
	fill(t, v1, 10)
	ids := map[string]ebpf.MapID{}
	for _, n := range []string{ctName, cntName, evName} {
		ids[n] = bpftest.MapID(t, v1.Maps[n])
	}
	unchanged := func(t *testing.T) {
		t.Helper()
		for n, id := range ids {
			if got := pinnedID(t, filepath.Join(dir, n)); got != id {
				t.Errorf("pin %s: map %d, want the old %d untouched", n, got, id)
			}
		}
		if n, _ := countEntries(v1.Maps[ctName], 16); n != 10 {
			t.Errorf("old map has %d entries, want 10", n)
		}
		noTempPins(t, dir)
	}

	// The ring buffer grows too: a failure on one map replaces none.
	_, err := MigrateMaps(spec(4, 8, 4, 8192), dir, table(), nil)
	if err == nil || !strings.Contains(err.Error(), ctName+" holds 10 entries, more than the new max_entries 4") {
		t.Fatalf("shrink: err %v", err)
	}
	unchanged(t)

	// Per-CPU array shrunk with non-zero counters past the new size.
	_, err = MigrateMaps(spec(16, 8, 2, 4096), dir, table(), nil)
	if err == nil || !strings.Contains(err.Error(), cntName+" holds 4 entries, more than the new max_entries 2") {
		t.Fatalf("array shrink: err %v", err)
	}
	unchanged(t)

	noUpgrade := table()
	noUpgrade[0].Upgrades = nil
	_, err = MigrateMaps(spec(16, 16, 4, 4096), dir, noUpgrade, nil)
	if err == nil || !strings.Contains(err.Error(), "no upgrade from that layout") {
		t.Fatalf("unknown layout: err %v", err)
	}
	unchanged(t)

	// The upgrade registered for 8-byte values produces v2 (16 bytes),
	// not what a 24-byte spec wants: found while copying, after the
	// other maps were built and pinned at temporary names.
	_, err = MigrateMaps(spec(16, 24, 8, 8192), dir, table(), nil)
	if err == nil || !strings.Contains(err.Error(), "upgrade from v1 does not produce v2") {
		t.Fatalf("wrong upgrade: err %v", err)
	}
	unchanged(t)

	_, err = MigrateMaps(spec(32, 8, 4, 4096), dir, table()[1:], nil)
	if err == nil || !strings.Contains(err.Error(), ctName+" changed layout and has no migration policy") {
		t.Fatalf("no table entry: err %v", err)
	}
	unchanged(t)
}

// A crash between pinning the new map at the temporary name and the rename
// leaves the old pin and a temporary one: the next load removes the
// temporary pin and migrates from the old map again. Abort (a failed load
// after the rename) puts the old maps back.
func TestMigrateRecovers(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	v1 := load(t, spec(16, 8, 4, 4096), dir)
	fill(t, v1, 10)
	oldID := bpftest.MapID(t, v1.Maps[ctName])

	// The crashed attempt: a half-filled new map at the temporary name.
	half, err := ebpf.NewMap(&ebpf.MapSpec{Name: ctName, Type: ebpf.LRUHash, KeySize: 4, ValueSize: 8, MaxEntries: 64})
	if err != nil {
		t.Fatal(err)
	}
	if err := half.Update(uint32(0), uint64(99), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if err := half.Pin(TempPin(filepath.Join(dir, ctName))); err != nil {
		t.Fatal(err)
	}
	halfID := bpftest.MapID(t, half)
	half.Close()

	v2spec := spec(64, 8, 4, 4096)
	mg, err := MigrateMaps(v2spec, dir, table(), nil)
	if err != nil {
		t.Fatal(err)
	}
	noTempPins(t, dir)
	bpftest.WaitMapFreed(t, "map", halfID)

	// The load fails (say the verifier refuses the new programs): Abort
	// restores the old pin, which the old programs still use.
	if err := mg.Abort(); err != nil {
		t.Fatal(err)
	}
	if got := pinnedID(t, filepath.Join(dir, ctName)); got != oldID {
		t.Fatalf("after abort the pin holds map %d, want the old %d", got, oldID)
	}
	noTempPins(t, dir)

	// The retry migrates from the old map, with every entry.
	mg, err = MigrateMaps(v2spec, dir, table(), nil)
	if err != nil {
		t.Fatal(err)
	}
	v2 := load(t, v2spec, dir)
	if err := mg.Finish(); err != nil {
		t.Fatal(err)
	}
	for i := range uint32(10) {
		var v uint64
		if err := v2.Maps[ctName].Lookup(i, &v); err != nil || v != uint64(i)*10 {
			t.Errorf("flow %d: %d, %v", i, v, err)
		}
	}
	noTempPins(t, dir)
}

// rename(2) on bpffs replaces an existing pin (the property the migration
// relies on): the name points at the new map at once, and the old map
// stays alive for whoever holds it.
func TestBPFFSRenameReplaces(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := bpftest.BPFFS(t)
	mk := func(v uint64) *ebpf.Map {
		m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		if err := m.Update(uint32(0), v, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
		return m
	}
	a, b := mk(1), mk(2)
	pin := filepath.Join(dir, "kebpf_x")
	if err := a.Pin(pin); err != nil {
		t.Fatal(err)
	}
	if err := b.Pin(TempPin(pin)); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(TempPin(pin), pin); err != nil {
		t.Fatalf("rename over a pin on bpffs: %v", err)
	}
	if got := pinnedID(t, pin); got != bpftest.MapID(t, b) {
		t.Fatalf("pin holds map %d, want the renamed %d", got, bpftest.MapID(t, b))
	}
	var v uint64
	if err := a.Lookup(uint32(0), &v); err != nil || v != 1 {
		t.Fatalf("old map after the rename: %d, %v", v, err)
	}
	if _, err := os.Stat(TempPin(pin)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary name still present: %v", err)
	}
	// bpffs refuses a dot in a name: why the temporary suffix has none.
	c, err := b.Clone()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Pin(filepath.Join(dir, "kebpf_x.tmp")); err == nil {
		t.Error("bpffs accepted a dotted name; the temporary suffix could use one")
	}
}

// Why a SOCKHASH is recreated rather than copied: user space inserts a
// socket by fd, but a lookup gives back its cookie, which no update
// accepts. MigrateMaps refuses a copy policy for it.
func TestSockhashCannotBeCopied(t *testing.T) {
	bpftest.RequireRoot(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cookie, err := unix.GetsockoptUint64(int(f.Fd()), unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	ms := &ebpf.MapSpec{Name: "kebpf_t_socks", Type: ebpf.SockHash, KeySize: 4, ValueSize: 8, MaxEntries: 4, Pinning: ebpf.PinByName}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ms.Type, KeySize: 4, ValueSize: 8, MaxEntries: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Update(uint32(1), uint64(f.Fd()), ebpf.UpdateAny); err != nil {
		t.Fatalf("insert socket by fd: %v", err)
	}
	var got uint64
	if err := m.Lookup(uint32(1), &got); err != nil {
		t.Fatal(err)
	}
	if got != cookie {
		t.Fatalf("lookup = %d, want the socket cookie %d", got, cookie)
	}
	if err := m.Update(uint32(2), got, ebpf.UpdateAny); err == nil {
		t.Fatal("a SOCKHASH accepted a socket cookie as value: it could be copied")
	}

	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(dir, ms.Name)); err != nil {
		t.Fatal(err)
	}
	grown := ms.Copy()
	grown.MaxEntries = 8
	spec := &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{ms.Name: grown}}
	_, err = MigrateMaps(spec, dir, []VersionedMap{{Name: ms.Name, Version: 1, Policy: Migrate, Why: "test"}}, nil)
	if err == nil || !strings.Contains(err.Error(), "cannot be copied") {
		t.Fatalf("migrate policy on a SOCKHASH: err %v", err)
	}
	if err := CheckTable(spec, []VersionedMap{{Name: ms.Name, Version: 1, Policy: Migrate, Why: "test"}}); err == nil {
		t.Fatal("CheckTable accepted a copy policy for a SOCKHASH")
	}
}

// An LRU copy close to max_entries may evict (the kernel refills per-CPU
// free lists in batches): what was lost is counted and logged as a warning,
// never silent.
func TestMigrateLRUNearFull(t *testing.T) {
	bpftest.RequireRoot(t)
	dir := filepath.Join(bpftest.BPFFS(t), "maps")
	if err := MkdirAll(dir); err != nil {
		t.Fatal(err)
	}
	const n = 1000
	v1 := load(t, spec(4096, 8, 4, 4096), dir)
	fill(t, v1, n)
	v1.Close()
	var logs bytes.Buffer
	v2spec := spec(n, 8, 4, 4096)
	mg, err := MigrateMaps(v2spec, dir, table(), logTo(&logs))
	if err != nil {
		t.Fatal(err)
	}
	v2 := load(t, v2spec, dir)
	if err := mg.Finish(); err != nil {
		t.Fatal(err)
	}
	have, err := countEntries(v2.Maps[ctName], n)
	if err != nil {
		t.Fatal(err)
	}
	// The catch-up adds nothing (no program wrote the old map) and does
	// not bring evicted entries back (which would evict others in turn).
	want := fmt.Sprintf("copied=%d catch_up=0 evicted_by_lru=%d", n, n-have)
	if !strings.Contains(logs.String(), want) {
		t.Errorf("log lacks %q:\n%s", want, logs.String())
	}
	if have < n && !strings.Contains(logs.String(), "level=WARN msg=\"pinned map migrated") {
		t.Errorf("evictions logged below warning:\n%s", logs.String())
	}
	t.Logf("%d of %d entries kept in an LRU of %d:\n%s", have, n, n, logs.String())
}
