//go:build linux

package sockmap

import (
	"net/netip"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

func attachSocketLB(tb testing.TB, cg string) *socklb.Objects {
	tb.Helper()
	pd := bpftest.PinDir(tb)
	lb, err := socklb.Load(pd, socklb.LoadOptions{MaxFrontends: 64, MaxBackends: 64, MaxAffinity: 64, MaxRevNAT: 64})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { lb.Close() })
	if err := lb.Attach(cg); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := socklb.DetachPinned(pd); err != nil {
			tb.Errorf("detach socklb: %v", err)
		}
	})
	return lb
}

// TestAfterSocketLB: with the socket LB attached first at the same cgroup,
// a connection to a ClusterIP whose backend is a steered pod lands on Envoy
// with the backend as the original destination; the LB attached after
// steering is reported by CheckOrder (that order would bypass Envoy).
func TestAfterSocketLB(t *testing.T) {
	var lb *socklb.Objects
	r := newRigWith(t, func(cg string) { lb = attachSocketLB(t, cg) })
	vip := netip.AddrPortFrom(netip.MustParseAddr("10.96.77.7"), 80)
	if err := lb.Apply(socklb.Service{
		ID:        1,
		Frontends: []socklb.Frontend{{IP: vip.Addr(), Port: vip.Port(), Proto: socklb.TCP}},
		Backends:  []socklb.Backend{{IP: r.podAddr.Addr(), Port: r.podAddr.Port()}},
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := dialFrom(t, r.app, vip); err != nil {
		t.Fatalf("dial ClusterIP %s: %v", vip, err)
	}
	ec := accept(t, r.envoyLn)
	if got, err := origDst(t, ec); err != nil || got != r.podAddr {
		t.Fatalf("SO_ORIGINAL_DST via ClusterIP = %s, %v; want the backend %s", got, err, r.podAddr)
	}
	if err := CheckOrder(r.cg); err != nil {
		t.Fatalf("CheckOrder with socklb first: %v", err)
	}

	// The LB re-attached after steering: a ClusterIP connect would be
	// steered on the VIP (never selected) and reach the pod around Envoy.
	if err := lb.Detach(); err != nil {
		t.Fatal(err)
	}
	lb2 := attachSocketLB(t, r.cg)
	_ = lb2
	if err := CheckOrder(r.cg); err == nil {
		t.Fatal("CheckOrder accepted socklb's connect4 running after steering")
	}
}
