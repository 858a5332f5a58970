//go:build linux

package bpftest

import (
	"testing"

	"github.com/cilium/ebpf"
)

// ProgRunUnsupported checks that the kernel has no BPF_PROG_TEST_RUN for
// program prog of spec (loaded with its maps unpinned): why a package tests
// its flows with real sockets instead of a prog.Run table. When a kernel
// adds it, this fails, and a prog.Run table test should join.
func ProgRunUnsupported(tb testing.TB, spec *ebpf.CollectionSpec, prog string) {
	tb.Helper()
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		tb.Fatal(err)
	}
	defer coll.Close()
	_, err = coll.Programs[prog].Run(&ebpf.RunOptions{Context: make([]byte, 80)})
	if err == nil {
		tb.Fatalf("BPF_PROG_TEST_RUN works for %s (%s) on this kernel: add a prog.Run table test", prog, coll.Programs[prog].Type())
	}
	tb.Logf("prog.Run: %v (expected: not supported for this program type)", err)
}
