package bpftest

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// MapID is m's kernel ID.
func MapID(t testing.TB, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("map info without an ID (kernel < 4.13)")
	}
	return id
}

// WaitMapFreed waits up to 5 s for the kernel to free map id (its last
// reference gone: no program, pin or fd holds it) and fails the test if
// it does not; what names the map in the failure.
func WaitMapFreed(t testing.TB, what string, id ebpf.MapID) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		m, err := ebpf.NewMapFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			return
		}
		if err == nil {
			m.Close()
		}
		if time.Now().After(deadline) {
			t.Errorf("old %s (map %d) still alive: something still holds it (err %v)", what, id, err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
