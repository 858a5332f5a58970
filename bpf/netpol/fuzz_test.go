//go:build linux

package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
)

// Fuzzing the programs through BPF_PROG_TEST_RUN against the reference
// datapath of refmodel_test.go. Both targets run their seed corpus as plain
// tests in the root tier (`go test ./bpf/netpol`) and fuzz with
//
//	go test -run '^$' -fuzz FuzzWellFormed -fuzztime 3m ./bpf/netpol/
//	go test -run '^$' -fuzz FuzzFrames -fuzztime 3m ./bpf/netpol/
//
// Crashers land in testdata/fuzz/<target> and are committed as seeds.

// The fuzzed endpoint's policy: nested v4 and v6 prefixes with excepts,
// port ranges, protocol-only rules, a rule with ports but no protocol, and
// a prefix with the full 16 rules (the program's bounded scan).
func fzEndpoint(ing, egr bool) EndpointPolicy {
	sixteen := make([]PortRule, MaxRulesPerPrefix)
	for i := range sixteen {
		sixteen[i] = rule(UDP, uint16(100+i), 0, 15, uint16(i))
	}
	sixteen[15] = rule(TCP, 7, 0, 15, 15)
	return EndpointPolicy{
		ID: 42, IfIndex: testIfindex, IPs: []netip.Addr{addr(podIP), addr(podIP6)},
		IngressEnforced: ing, EgressEnforced: egr, DefaultDenyPolicy: 99,
		Ingress: []PeerEntry{
			peer("0.0.0.0/0", rule(UDP, 53, 0, 1, 0)),
			peer("10.0.0.0/8"),
			peer("10.125.0.0/16", rule(TCP, 80, 0, 2, 0), rule(TCP, 8000, 8100, 2, 1), rule(SCTP, 9000, 0, 2, 2)),
			peer("10.125.0.0/24", rule(AnyProto, 0, 0, 3, 0)),
			peer("10.125.0.128/25", rule(TCP, 443, 0, 4, 0), rule(AnyProto, 1000, 2000, 4, 1)),
			peer("10.125.0.200/32"),
			peer("10.125.1.0/24", rule(Proto(1), 0, 0, 5, 0), rule(UDP, 0, 0, 5, 1)),
			peer("10.125.2.0/24", sixteen...),
			peer("::/0", rule(TCP, 22, 0, 6, 0)),
			peer("fd00:125::/64", rule(AnyProto, 0, 0, 7, 0)),
			peer("fd00:125::ff/128"),
			peer("fd00:125::/48", rule(UDP, 53, 0, 8, 0), rule(SCTP, 1, 65535, 8, 1)),
			peer("2001:db8::/32", rule(Proto(58), 0, 0, 9, 0), rule(TCP, 65535, 0, 9, 1)),
		},
		Egress: []PeerEntry{
			peer("10.125.0.0/24", rule(TCP, 80, 80, 10, 0), rule(UDP, 53, 0, 10, 1)),
			peer("10.125.0.10/32", rule(AnyProto, 0, 0, 11, 0)),
			peer("192.0.2.0/24", rule(SCTP, 0, 0, 12, 0)),
			peer("10.125.2.0/24", sixteen...),
			peer("fd00:125::/64", rule(TCP, 443, 0, 13, 0)),
			peer("::/0", rule(Proto(58), 0, 0, 14, 0)),
		},
	}
}

var fzHosts = []netip.Addr{addr(hostIP), addr("fd00:125::1")}

// Addresses the fuzzer picks by index: around every prefix edge of
// fzEndpoint, the node, the pod itself and a v4-mapped v6 address.
var (
	fzPool4 = []string{podIP, hostIP, peerA, "10.125.0.127", "10.125.0.128", "10.125.0.130", peerB,
		"10.125.1.5", "10.125.2.9", "10.9.9.9", "10.255.255.255", "192.0.2.1", "0.0.0.0", "255.255.255.255"}
	fzPool6 = []string{podIP6, "fd00:125::1", peer6, "fd00:125::ff", "fd00:125:0:1::1", "fd00:126::1",
		"2001:db8::1", "2001:db9::1", "::ffff:10.125.0.10", "::", "fe80::1", "ff02::1"}
)

// fzState is one loaded datapath per enforcement variant (none, ingress,
// egress, both), each with the reference model of its endpoint.
type fzState struct {
	objs [4]*Objects
	ref  [4]*refDP
}

func fzLoad(f *testing.F) *fzState {
	f.Helper()
	bpftest.RequireRoot(f)
	root := bpftest.BPFFS(f)
	var s fzState
	for v := range 4 {
		ep := fzEndpoint(v&1 != 0, v&2 != 0)
		o := loadMaps(f, root, LoadOptions{})
		mustApply(f, o, ep)
		if err := o.SetHostIPs(fzHosts); err != nil {
			f.Fatal(err)
		}
		s.objs[v], s.ref[v] = o, newRefDP(ep, fzHosts)
	}
	return &s
}

// reset empties conntrack, in the maps and in the model: every fuzz input
// starts from the same state, so a failure replays alone.
func (s *fzState) reset(t *testing.T, v int) {
	t.Helper()
	ct := s.objs[v].objs.KebpfNpCt
	keys, err := mapKeys[NetpolCtKey](ct)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := ct.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
	}
	s.ref[v].reset()
}

// maxFrame keeps frames well below what BPF_PROG_TEST_RUN accepts for an
// skb (a page minus headroom and skb_shared_info), which a pod's MTU-sized
// packet never nears either.
const maxFrame = 2048

// send runs frame through variant v's program for dir and checks the verdict
// against the model; a frame the kernel refuses must be one runRefused
// predicts (and changes no state). It returns the verdict.
func (s *fzState) send(t *testing.T, v int, dir Direction, name string, frame []byte) int32 {
	t.Helper()
	from, to := s.objs[v].Programs()
	prog := to
	if dir == Egress {
		prog = from
	}
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame})
	if runRefused(frame) {
		if !errors.Is(err, unix.EINVAL) {
			t.Fatalf("%s (variant %d, dir %d): prog.Run returned %d, %v; want EINVAL for a frame of %d bytes\nframe %x", name, v, dir, int32(ret), err, len(frame), frame)
		}
		return actRejected
	}
	if err != nil {
		t.Fatalf("%s (variant %d, dir %d): prog.Run: %v\nframe %x", name, v, dir, err, frame)
	}
	got := int32(ret)
	want, why := s.ref[v].run(dir, frame)
	if got != want {
		t.Fatalf("%s (variant %d, dir %d): program %s, model %s (%s)\nframe %x", name, v, dir, actName(got), actName(want), why, frame)
	}
	return got
}

// fzAddr picks an address of the family from b: a pool entry, or (first byte
// >= 0xc0) the following bytes as raw address bytes.
func fzAddr(b []byte, v6 bool) netip.Addr {
	pool := fzPool4
	if v6 {
		pool = fzPool6
	}
	if len(b) == 0 || b[0] < 0xc0 {
		i := 0
		if len(b) > 0 {
			i = int(b[0])
		}
		return addr(pool[i%len(pool)])
	}
	var raw [16]byte
	copy(raw[:], b[1:])
	if !v6 {
		return netip.AddrFrom4([4]byte(raw[:4]))
	}
	return netip.AddrFrom16(raw)
}

// fzProto maps the fuzzer's byte to a protocol: mostly the ones with ports
// or ICMP, else any other number (not one the IPv6 parser takes for an
// extension header: a bare one would be a malformed packet).
func fzProto(b uint8, v6 bool) uint8 {
	switch b % 8 {
	case 0, 1:
		return 6
	case 2:
		return 17
	case 3:
		return 132
	case 4:
		if v6 {
			return 58
		}
		return 1
	case 5: // ICMP of the other family (parsed as ICMP all the same)
		if v6 {
			return 1
		}
		return 58
	}
	switch b {
	case 6, 17, 132, 1, 58:
		return 47
	case 0, 43, 60, 51, 44:
		if v6 {
			return 47
		}
	}
	return b
}

// Selector bits of FuzzWellFormed.
const (
	fzVariant  = 0x3    // enforcement: none, ingress, egress, both
	fzEgress   = 1 << 2 // the packet leaves the pod (from program)
	fzV6       = 1 << 3
	fzFragMask = 3 << 4 // 1: first fragment, 2: non-first fragment
	fzVLAN     = 1 << 6 // tag the frame (QinQ with fzQinQ)
	fzQinQ     = 1 << 7
	fzReply    = 1 << 8  // then the reply through the other program
	fzICMPErr  = 1 << 9  // then an ICMP error about the first packet
	fzRandPod  = 1 << 10 // the pod side's address from podSel, not the pod's own
)

// FuzzWellFormed builds well-formed frames from fuzzed fields (family,
// protocol, addresses, ports, TCP flags / ICMP type, IPv4 options or IPv6
// extension headers, fragments, VLAN tags) and sends a packet, optionally
// its reply and an ICMP error about it. Each verdict must equal the model's;
// the model's parse must agree with how the frame was built (so the model
// is not just reading back the same mistake); and for a packet policy
// decides, Decide (the explain path of `kubectl ebpf trace`) must give the
// same verdict from the maps.
func FuzzWellFormed(f *testing.F) {
	s := fzLoad(f)
	type seed struct {
		sel          uint16
		pod, remote  []byte
		proto, flags uint8
		sport, dport uint16
		hdr          []byte
	}
	p4 := func(i byte) []byte { return []byte{i} }
	for _, sd := range []seed{
		{sel: 1, remote: p4(2), proto: 0, flags: tcpSYN, sport: 40000, dport: 80},
		{sel: 3 | fzReply | fzICMPErr, remote: p4(2), proto: 0, flags: tcpSYN, sport: 40000, dport: 8050},
		{sel: 3 | fzEgress | fzReply, remote: p4(2), proto: 2, sport: 33333, dport: 53},
		{sel: 3 | fzEgress | fzReply | fzICMPErr, remote: p4(9), proto: 3, sport: 5, dport: 9},
		{sel: 1 | fzReply, remote: p4(7), proto: 4, flags: 8, sport: 77},
		{sel: 1 | fzV6 | fzReply | fzICMPErr, remote: p4(2), proto: 0, flags: tcpSYN, sport: 1, dport: 80, hdr: []byte{0, 2, 3, 1}},
		{sel: 1 | fzV6, remote: p4(10), proto: 4, flags: 135},
		{sel: 1 | fzV6 | 1<<4, remote: p4(2), proto: 2, sport: 1, dport: 53, hdr: []byte{4}},
		{sel: 1 | 2<<4, remote: p4(4), proto: 2, sport: 1, dport: 81},
		{sel: 1 | 1<<4, remote: p4(5), proto: 0, flags: tcpSYN, sport: 1, dport: 443, hdr: []byte{1, 1, 1, 0}},
		{sel: 3 | fzVLAN, remote: p4(2), proto: 0, flags: tcpSYN, sport: 1, dport: 80},
		{sel: 0 | fzVLAN | fzQinQ, remote: p4(2), proto: 0, flags: tcpSYN, sport: 1, dport: 80},
		{sel: 2 | fzEgress | fzReply, remote: p4(9), proto: 2, sport: 1, dport: 53},
		{sel: 3, remote: p4(8), proto: 0, flags: tcpRST, sport: 1, dport: 7},
		{sel: 3 | fzEgress | fzReply, remote: p4(1), proto: 0, flags: tcpSYN | tcpFIN, sport: 1, dport: 22},
		{sel: 2 | fzV6 | fzEgress | fzReply | fzICMPErr, remote: p4(6), proto: 4, flags: 128, sport: 9},
		{sel: 1 | fzV6 | fzRandPod, pod: []byte{0xc0, 0xfd}, remote: []byte{0xff, 0xfd, 0, 1, 0x25}, proto: 7, sport: 1, dport: 2, hdr: []byte{0, 0, 0, 0, 0, 0, 0}},
	} {
		f.Add(sd.sel, sd.pod, sd.remote, sd.proto, sd.flags, sd.sport, sd.dport, sd.hdr)
	}
	f.Fuzz(func(t *testing.T, sel uint16, podSel, remoteSel []byte, protoSel, flags uint8, sport, dport uint16, hdr []byte) {
		v := int(sel & fzVariant)
		s.reset(t, v)
		dir := Ingress
		if sel&fzEgress != 0 {
			dir = Egress
		}
		v6 := sel&fzV6 != 0
		local := addr(podIP)
		if v6 {
			local = addr(podIP6)
		}
		if sel&fzRandPod != 0 {
			local = fzAddr(podSel, v6)
		}
		remote := fzAddr(remoteSel, v6)
		p := pkt{src: remote, dst: local, proto: fzProto(protoSel, v6), sport: sport, dport: dport, flags: flags}
		if dir == Egress {
			p.src, p.dst = local, remote
		}
		if p.proto == 1 || p.proto == 58 {
			p.icmpType, p.icmpID, p.flags = flags, sport, 0
		}
		frag := (sel & fzFragMask) >> 4
		if frag == 1 || frag == 2 {
			p.mf = true
		}
		if frag == 2 {
			p.fragOff = 1 + sport%8190
		}
		// What the parser must make of it, from the fields alone.
		want, why := refOK, ""
		if v6 {
			for i, b := range hdr {
				if i == 8 {
					break
				}
				p.ext = append(p.ext, []uint8{0, 43, 60, 51, 44}[b%5])
			}
			if frag != 0 && !containsByte(p.ext, 44) {
				p.ext = append(p.ext, 44)
			}
			for i, e := range p.ext {
				if i == 6 {
					want, why = refDrop, "more than 6 extension headers"
					break
				}
				if e == 44 && p.fragOff != 0 {
					want, why = refPass, "non-first fragment"
					break
				}
			}
		} else {
			n := min(len(hdr), 40) &^ 3
			p.opts = hdr[:n]
			if p.fragOff != 0 {
				want, why = refPass, "non-first fragment"
			}
		}
		if want == refOK && v6 && p.proto == 58 && ((p.icmpType >= 130 && p.icmpType <= 137) || p.icmpType == 143) {
			want, why = refPass, "ndp/mld"
		}
		frame := p.frame()
		if sel&fzVLAN != 0 {
			tag := []byte{0x81, 0x00, 0x00, 0x05}
			if sel&fzQinQ != 0 {
				tag[0], tag[1] = 0x88, 0xa8
			}
			frame = append(append(append([]byte{}, frame[:12]...), tag...), frame[12:]...)
			want, why = refDrop, "vlan"
		}
		rp := refParse(frame)
		if rp.res != want {
			t.Fatalf("model parses %s as %s (%s), built to be %s (%s)\nframe %x", fzDesc(p), rp.res, rp.why, want, why, frame)
		}
		if want == refOK {
			wantPorts := p.proto == 6 || p.proto == 17 || p.proto == 132
			if rp.src != p.src || rp.dst != p.dst || rp.proto != p.proto || rp.hasPorts != wantPorts ||
				(wantPorts && (rp.sport != p.sport || rp.dport != p.dport)) || (p.proto == 6 && rp.tcpFlags != p.flags) {
				t.Fatalf("model parses %s as %+v\nframe %x", fzDesc(p), rp, frame)
			}
		}

		got := s.send(t, v, dir, "packet", frame)

		// Decide answers from the maps for a new flow policy judges; it
		// takes the pod by address and unmaps v4-mapped ones (a question,
		// not a packet), so only the pod's own address and unmapped peers.
		if want == refOK && (local == addr(podIP) || local == addr(podIP6)) && !remote.Is4In6() {
			q := Question{Src: p.src, Dst: p.dst, Proto: Proto(p.proto), Dir: dir}
			if rp.hasPorts {
				q.DstPort = p.dport
			}
			d, err := s.objs[v].Decide(q)
			if err != nil {
				t.Fatalf("Decide %+v: %v", q, err)
			}
			if (d.Verdict == VerdictAllow) != (got == actPass) {
				t.Fatalf("Decide %+v: %+v, program %s", q, d, actName(got))
			}
		}

		back := Egress - dir
		if sel&fzReply != 0 {
			r := pkt{src: p.dst, dst: p.src, proto: p.proto, sport: p.dport, dport: p.sport, flags: tcpACK}
			if p.proto == 1 || p.proto == 58 {
				r.icmpType, r.icmpID, r.flags = 0, p.icmpID, 0 // echo reply (v4)
				if p.proto == 58 {
					r.icmpType = 129
				}
			}
			s.send(t, v, back, "reply", r.frame())
		}
		if sel&fzICMPErr != 0 {
			// The error comes back from the packet's destination, embedding
			// its IP header(s) and the first 8 bytes after them.
			ip := p.ip()
			hl := 20 + len(p.opts)
			if v6 {
				hl = 40
				for _, x := range p.ext {
					hl += map[bool]int{true: 12, false: 8}[x == 51]
				}
			}
			e := pkt{src: p.dst, dst: p.src, proto: 1, icmpType: 3, inner: ip[:min(len(ip), hl+8)]}
			if v6 {
				e.proto, e.icmpType = 58, 1
			}
			s.send(t, v, back, "icmp error", e.frame())
		}
	})
}

// fzDesc names a built packet in failure messages.
func fzDesc(p pkt) string {
	return fmt.Sprintf("%s:%d -> %s:%d proto %d flags/type %#x/%d opts %x ext %v frag %d mf %v",
		p.src, p.sport, p.dst, p.dport, p.proto, p.flags, p.icmpType, p.opts, p.ext, p.fragOff, p.mf)
}

func containsByte(s []uint8, b uint8) bool {
	for _, x := range s {
		if x == b {
			return true
		}
	}
	return false
}

// FuzzFrames sends arbitrary (mutated, truncated, garbage) frames, up to
// three in a row through the same endpoint so conntrack state carries
// between them: the program must give exactly the model's verdict for each,
// which for a malformed frame means the parser's documented drop or pass
// (README "Parser"): a truncated or inconsistent header is never judged by
// ports it does not fully carry. The kernel may refuse a frame only where
// runRefused says.
func FuzzFrames(f *testing.F) {
	s := fzLoad(f)
	syn := tcpPkt(peerA, podIP, 40000, 80, tcpSYN)
	syn6 := pkt{src: addr(peer6), dst: addr(podIP6), proto: 6, sport: 2, dport: 80, flags: tcpSYN, ext: []uint8{0, 60, 43, 51}}
	udp := udpPkt(podIP, "10.125.0.53", 33333, 53)
	cut := func(p pkt, n int) []byte { p.cut = n; return p.frame() }
	seeds := [][3][]byte{
		{syn.frame(), syn.reply(tcpSYN | tcpACK).frame(), icmpErr(podIP, syn).frame()},
		{syn6.frame(), syn6.reply(tcpACK).frame(), icmpErr(podIP6, pkt{src: addr(peer6), dst: addr(podIP6), proto: 6, sport: 2, dport: 80}).frame()},
		{udp.frame(), udp.reply(0).frame(), nil},
		{icmpPkt(podIP, peerA, 8, 77).frame(), icmpPkt(peerA, podIP, 0, 77).frame(), nil},
		{pkt{src: addr(peerA), dst: addr(podIP), proto: 6, sport: 1, dport: 80, flags: tcpSYN, opts: []byte{1, 1, 1, 0}}.frame(), nil, nil},
		{pkt{src: addr(peerA), dst: addr(podIP), proto: 17, fragOff: 185}.frame(), pkt{src: addr(peerA), dst: addr(podIP), proto: 17, sport: 3, dport: 81, mf: true}.frame(), nil},
		{pkt{src: addr(peer6), dst: addr(podIP6), proto: 6, ext: []uint8{44}, fragOff: 100}.frame(), icmpPkt("fe80::1", "ff02::1:ff00:2", 135, 0).frame(), nil},
		{pkt{etherType: 0x0806}.frame(), pkt{etherType: 0x8100}.frame(), pkt{etherType: 0x88cc}.frame()},
		{cut(syn, 14+20+10), cut(udp, 14+20+4), cut(syn6, 14+41)},
		{cut(pkt{src: addr(podIP), dst: addr(peerA), proto: 6, opts: make([]byte, 8)}, 14+24), cut(pkt{src: addr(podIP6), dst: addr(peer6), proto: 132}, 14+40+6), nil},
		{pkt{src: addr(podIP), dst: addr(peerA), proto: 17, sport: 1, dport: 2, mangle: func(h []byte) { h[2], h[3] = 0, 20 }}.frame(), nil, nil},
		{pkt{src: addr(podIP), dst: addr(peerA), proto: 17, sport: 1, dport: 2, mangle: func(h []byte) { h[0] = 0x44 }}.frame(), nil, nil},
		{make([]byte, 10), cut(syn, 14+10), cut(syn6, 14+20)},
	}
	for i, sd := range seeds {
		f.Add(uint8(i), sd[0], sd[1], sd[2])
	}
	// Both enforced, both frames leaving the pod: a SYN to peerA (allowed,
	// tracked), then an ICMP error to peerB (ICMP denied) naming that flow.
	// Before errors had to go back to the embedded sender, it passed.
	f.Add(uint8(3|1<<2|1<<3), tcpPkt(podIP, peerA, 5555, 80, tcpSYN).frame(),
		pkt{src: addr(podIP), dst: addr(peerB), proto: 1, icmpType: 3, inner: tcpPkt(peerA, podIP, 80, 5555, tcpSYN|tcpACK).ip()[:28]}.frame(), []byte(nil))
	f.Fuzz(func(t *testing.T, sel uint8, a, b, c []byte) {
		v := int(sel & 3)
		s.reset(t, v)
		for i, frame := range [][]byte{a, b, c} {
			if len(frame) == 0 {
				continue
			}
			frame = frame[:min(len(frame), maxFrame)]
			dir := Direction(sel >> (2 + i) & 1)
			s.send(t, v, dir, fmt.Sprintf("frame %d", i), frame)
		}
	})
}
