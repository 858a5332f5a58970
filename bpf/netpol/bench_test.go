//go:build linux

package netpol

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// BenchmarkVerdict runs the to-pod program in the kernel (BPF_PROG_TEST_RUN
// with repeat) for one endpoint with 0..10k peer prefixes, each with a few
// port rules:
//
//   - established: the packet belongs to a tracked flow (ep lookup + one
//     conntrack lookup + counter).
//   - new: the packet's peer matches a prefix whose rules do not allow its
//     port, so every repetition takes the full verdict path (conntrack miss,
//     host-IP check, LPM lookup, full rule scan, rate-limited verdict record);
//     an allowed new flow costs the same plus one conntrack insert.
//
// No assertions: numbers for `make bench`.
func BenchmarkVerdict(b *testing.B) {
	bpftest.RequireRoot(b)
	root := bpftest.BPFFS(b)
	for _, n := range []int{0, 10, 1000, 10000} {
		o := loadMaps(b, root, LoadOptions{MaxPolicyEntries: 32768})
		_, to := o.Programs()
		p := EndpointPolicy{ID: 42, IfIndex: testIfindex, IngressEnforced: true}
		for i := range n {
			// Distinct /32s spread over 10.0.0.0/8 and a mix of /24s.
			bits := 32
			if i%4 == 0 {
				bits = 24
			}
			a := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), byte(i % 7)})
			rules := []PortRule{rule(TCP, 80, 0, 1, 0), rule(UDP, 53, 0, 1, 1), rule(TCP, 8000, 8100, 2, 0), rule(SCTP, 9, 0, 3, 0)}
			p.Ingress = append(p.Ingress, PeerEntry{Prefix: netip.PrefixFrom(a, bits), Rules: rules})
		}
		mustApply(b, o, p)

		peerAddr := "10.125.0.10"
		if n > 0 {
			// A /32 of the set: the deepest kind of trie match.
			last := n - 1
			if last%4 == 0 {
				last--
			}
			if last < 0 {
				last = 1
			}
			peerAddr = netip.AddrFrom4([4]byte{10, byte(last >> 8), byte(last), byte(last % 7)}).String()
		}
		newFrame := tcpPkt(peerAddr, podIP, 40000, 22, tcpSYN).frame() // port not allowed
		estFrame := tcpPkt(peerAddr, podIP, 40001, 80, tcpACK).frame()
		if n == 0 {
			estFrame = nil
		}

		b.Run(fmt.Sprintf("prefixes=%d/new", n), func(b *testing.B) {
			bench(b, to, newFrame, actDrop)
		})
		if estFrame != nil {
			if got := run(b, to, estFrame); got != actPass {
				b.Fatalf("establishing flow: %s", actName(got))
			}
			b.Run(fmt.Sprintf("prefixes=%d/established", n), func(b *testing.B) {
				bench(b, to, estFrame, actPass)
			})
		} else {
			// No prefixes: nothing can be allowed; measure a not-enforced
			// direction instead (the cheapest enforced-endpoint path).
			from, _ := o.Programs()
			out := tcpPkt(podIP, "10.125.0.10", 40001, 80, tcpACK).frame()
			b.Run("prefixes=0/not-enforced-direction", func(b *testing.B) {
				bench(b, from, out, actPass)
			})
		}
	}
}

func bench(b *testing.B, prog *ebpf.Program, frame []byte, want int32) {
	b.Helper()
	ret, per, err := prog.Benchmark(frame, b.N, b.ResetTimer)
	if err != nil {
		b.Fatal(err)
	}
	if int32(ret) != want {
		b.Fatalf("verdict %s, want %s", actName(int32(ret)), actName(want))
	}
	b.ReportMetric(float64(per.Nanoseconds()), "kernel-ns/pkt")
}

// BenchmarkL7 prices what the L7 checks add: while steering is active
// (kebpf_l7_active), a pod no policy selects has its packets parsed
// (otherwise: endpoint lookup + one array lookup), a SYN to a pod costs one
// kebpf_l7_dst lookup, and a steered client's SYN gets two verdicts
// (client egress, destination ingress) and two verdict records.
func BenchmarkL7(b *testing.B) {
	bpftest.RequireRoot(b)
	o := loadMaps(b, "", LoadOptions{})
	from, to := o.Programs()
	mustApply(b, o, *endpoint(false, false, nil, nil))
	if err := o.SetHostIPs([]netip.Addr{addr(hostIP)}); err != nil {
		b.Fatal(err)
	}
	ack := tcpPkt(peerA, podIP, 40000, 80, tcpACK).frame()
	b.Run("endpoint-unknown", func(b *testing.B) {
		o2 := loadMaps(b, "", LoadOptions{})
		_, to2 := o2.Programs()
		bench(b, to2, ack, actPass)
	})
	b.Run("not-enforced/ack/steering-inactive", func(b *testing.B) { bench(b, to, ack, actPass) })
	setActive(b, o, true)
	b.Run("not-enforced/ack", func(b *testing.B) { bench(b, to, ack, actPass) })
	b.Run("not-enforced/syn-unsteered", func(b *testing.B) {
		bench(b, to, tcpPkt(peerA, podIP, 40000, 80, tcpSYN).frame(), actPass)
	})
	dst := EndpointPolicy{ID: 7, IfIndex: 77, IPs: []netip.Addr{addr("10.125.0.50")}, IngressEnforced: true,
		Ingress: []PeerEntry{peer(podIP+"/32", rule(TCP, 80, 0, 1, 0))}}
	mustApply(b, o, dst)
	mustApply(b, o, *endpoint(false, true, nil, []PeerEntry{peer("10.125.0.50/32", rule(TCP, 80, 0, 2, 0))}))
	setOrig(b, o, ap(hostIP+":15001"), ap(podIP+":40000"), ap("10.125.0.50:80"))
	b.Run("steered-client-syn", func(b *testing.B) {
		bench(b, from, tcpPkt(podIP, hostIP, 40000, 15001, tcpSYN).frame(), actPass)
	})
}
