//go:build linux

package netpol

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// Program return values (TC_ACT_UNSPEC = TCX_NEXT: pass on to the next
// program of the chain; TC_ACT_SHOT: drop).
const (
	actPass int32 = -1
	actDrop int32 = 2
)

// testIfindex is the endpoint interface in prog.Run tests: BPF_PROG_TEST_RUN
// hands the program an skb on the loopback device (ifindex 1) of the
// caller's netns. Maps only: noAttach keeps the programs off the real lo.
const testIfindex = 1

var pinSeq atomic.Int64

// loadMaps loads the datapath under a private bpffs without attaching.
func loadMaps(t testing.TB, root string, opts LoadOptions) *Objects {
	t.Helper()
	if root == "" {
		root = bpftest.BPFFS(t)
	}
	opts.noAttach = true
	// Small maps: LRU maps preallocate, and tests load dozens of times.
	def(&opts.MaxCT, 4096)
	def(&opts.MaxVerdicts, 4096)
	def(&opts.MaxPolicyEntries, 16384)
	def(&opts.MaxEndpoints, 64)
	pinDir := filepath.Join(root, fmt.Sprintf("kubectl-ebpf-%d", pinSeq.Add(1)))
	o, err := Load(pinDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}

// run feeds one frame to the from (pod egress) or to (pod ingress) program.
func run(t testing.TB, prog *ebpf.Program, frame []byte) int32 {
	t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame})
	if err != nil {
		t.Fatalf("prog.Run: %v", err)
	}
	return int32(ret)
}

func actName(a int32) string {
	switch a {
	case actPass:
		return "pass"
	case actDrop:
		return "drop"
	}
	return fmt.Sprintf("act(%d)", a)
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func mustApply(t testing.TB, o *Objects, p EndpointPolicy) {
	t.Helper()
	if err := o.ApplyEndpoint(p); err != nil {
		t.Fatal(err)
	}
}
