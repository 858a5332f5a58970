//go:build linux

package socklb

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// BenchmarkConnect measures connect() from a client in the test cgroup,
// through the attached programs with N services in the maps, against the
// same connect to the backend with no program attached ("direct"). udp is a
// connect() of a UDP socket (no packet: hook + route lookup only); tcp is a
// full loopback handshake. ns/op is the time spent in connect() alone, measured inside the client.
func BenchmarkConnect(b *testing.B) {
	bpftest.RequireRoot(b)
	ns := testNetns(b)
	// Two frontends (TCP and UDP) per service.
	o, _, cg := attachLB(b, LoadOptions{MaxFrontends: 2 * 100000})
	plain := bpftest.Cgroup(b)
	srv := startServer(b, ns, "tcp", "127.0.0.1:0")
	be := srv.backend()

	// VIPs in 198.18.0.0/15 (benchmarking range), routed nowhere in the netns.
	vip := func(i int) netip.Addr {
		return netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
	}
	run := func(b *testing.B, cgroup, kind, dst string) {
		res := runChild(b, cgroup, ns, op{Kind: kind, Dst: dst, Count: b.N})
		a := res[0][0]
		if a.Errno != "" {
			b.Fatalf("%s %s: %s: %s", kind, dst, a.Call, a.Errno)
		}
		b.ReportMetric(float64(a.Ns)/float64(b.N), "ns/op")
	}
	for _, kind := range []string{"udp", "tcp"} {
		b.Run(kind+"/direct", func(b *testing.B) { run(b, plain, "bench-"+kind, srv.Addr) })
	}
	have := 0
	for _, n := range []int{10, 1000, 10000, 100000} {
		for ; have < n; have++ {
			svc := Service{ID: uint32(have + 1), Backends: []Backend{be},
				Frontends: []Frontend{{IP: vip(have), Port: 80, Proto: TCP}, {IP: vip(have), Port: 80, Proto: UDP}}}
			if err := o.Apply(svc); err != nil {
				b.Fatal(err)
			}
		}
		// The last service added: no cache advantage over the others.
		dst := netip.AddrPortFrom(vip(n-1), 80).String()
		for _, kind := range []string{"udp", "tcp"} {
			b.Run(fmt.Sprintf("%s/services=%d", kind, n), func(b *testing.B) { run(b, cg, "bench-"+kind, dst) })
		}
	}
}
