//go:build linux

package socklb

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// flowWant is what a row of the flow table expects: either Errno (the
// failing syscall's errno), or replies only from Servers (and from every one
// of them when All), with Peer/From as getpeername and recvfrom show them.
type flowWant struct {
	Servers []string
	All     bool
	Peer    string
	From    string
	Errno   string
}

func checkFlow(t *testing.T, got []attempt, want flowWant) {
	t.Helper()
	seen := map[string]int{}
	for _, a := range got {
		if want.Errno != "" {
			if a.Errno != want.Errno {
				t.Errorf("attempt %+v: want errno %s", a, want.Errno)
			}
			continue
		}
		if a.Errno != "" {
			t.Errorf("attempt failed: %s: %s", a.Call, a.Errno)
			continue
		}
		if !slices.Contains(want.Servers, a.Server) {
			t.Errorf("reached %q, want one of %v", a.Server, want.Servers)
		}
		seen[a.Server]++
		if want.Peer != "" && a.Peer != want.Peer {
			t.Errorf("getpeername = %q, want %q", a.Peer, want.Peer)
		}
		if want.From != "" && a.From != want.From {
			t.Errorf("recvfrom source = %q, want %q", a.From, want.From)
		}
	}
	if want.All && len(seen) != len(want.Servers) {
		t.Errorf("reached %v, want all of %v", seen, want.Servers)
	}
}

func addrs(ss ...server) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Addr)
	}
	return out
}

// TestIntegrationFlows is the packet-flow table: real clients in the test
// cgroup and netns, real loopback servers, the real programs and maps.
func TestIntegrationFlows(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})

	tcp := startServers(t, ns, "tcp", "127.0.0.1:0", 3)
	tcpAlt := startServer(t, ns, "tcp", "127.0.0.1:0")
	direct := startServer(t, ns, "tcp", "127.0.0.1:0")
	udp := startServers(t, ns, "udp", "127.0.0.1:0", 3)
	tcp6 := startServers(t, ns, "tcp", "[::1]:0", 2)
	udp6 := startServers(t, ns, "udp", "[::1]:0", 2)

	for _, svc := range []Service{
		{ID: 1, Frontends: []Frontend{fe("10.96.0.10:80", TCP)}, Backends: backends(tcp...)},
		{ID: 2, Frontends: []Frontend{fe("10.96.0.10:53", UDP)}, Backends: backends(udp...)},
		// A second port of the same ClusterIP is its own service port.
		{ID: 3, Frontends: []Frontend{fe("10.96.0.10:8080", TCP)}, Backends: backends(tcpAlt)},
		{ID: 4, Frontends: []Frontend{fe("10.96.0.11:80", TCP)}},
		{ID: 5, Frontends: []Frontend{fe("10.96.0.11:53", UDP)}},
		{ID: 6, Frontends: []Frontend{fe("[fd00:96::1]:80", TCP)}, Backends: backends(tcp6...)},
		{ID: 7, Frontends: []Frontend{fe("[fd00:96::1]:53", UDP)}, Backends: backends(udp6...)},
		{ID: 8, Frontends: []Frontend{fe("[fd00:96::2]:80", TCP)}},
		// One service port reachable on several frontends (ClusterIP +
		// NodePort-style address) shares the backend set.
		{ID: 9, Frontends: []Frontend{fe("10.96.0.12:80", TCP), fe("127.0.0.1:30080", TCP)}, Backends: backends(tcp[0])},
	} {
		mustApply(t, o, svc)
	}

	tests := []struct {
		name string
		op   op
		want flowWant
	}{
		{"clusterIP TCP reaches all 3 backends, peer is VIP", op{Kind: "tcp", Dst: "10.96.0.10:80", Count: 40},
			flowWant{Servers: addrs(tcp...), All: true, Peer: "10.96.0.10:80"}},
		{"second port of the same VIP", op{Kind: "tcp", Dst: "10.96.0.10:8080", Count: 5},
			flowWant{Servers: addrs(tcpAlt), All: true, Peer: "10.96.0.10:8080"}},
		{"extra frontend of a service", op{Kind: "tcp", Dst: "127.0.0.1:30080", Count: 3},
			flowWant{Servers: addrs(tcp[0]), All: true, Peer: "127.0.0.1:30080"}},
		{"UDP unconnected: every backend, reply source is VIP", op{Kind: "udp", Dst: "10.96.0.10:53", Count: 40},
			flowWant{Servers: addrs(udp...), All: true, From: "10.96.0.10:53"}},
		{"UDP connected: peer and reply source are VIP", op{Kind: "udpconn", Dst: "10.96.0.10:53", Count: 40},
			flowWant{Servers: addrs(udp...), All: true, Peer: "10.96.0.10:53", From: "10.96.0.10:53"}},
		{"no endpoints TCP: ECONNREFUSED", op{Kind: "tcp", Dst: "10.96.0.11:80", Count: 3}, flowWant{Errno: "ECONNREFUSED"}},
		{"no endpoints UDP sendto: ECONNREFUSED", op{Kind: "udp", Dst: "10.96.0.11:53", Count: 3}, flowWant{Errno: "ECONNREFUSED"}},
		{"no endpoints UDP connect: ECONNREFUSED", op{Kind: "udpconn", Dst: "10.96.0.11:53", Count: 3}, flowWant{Errno: "ECONNREFUSED"}},
		{"non-service traffic untouched", op{Kind: "tcp", Dst: direct.Addr, Count: 3},
			flowWant{Servers: addrs(direct), All: true, Peer: direct.Addr}},
		// Untranslated traffic to a VIP has no route in the test netns.
		{"VIP port without service passes untranslated", op{Kind: "tcp", Dst: "10.96.0.10:81"}, flowWant{Errno: "ENETUNREACH"}},
		{"UDP to TCP-only service port passes untranslated", op{Kind: "udp", Dst: "10.96.0.10:80"}, flowWant{Errno: "ENETUNREACH"}},
		{"IPv6 ClusterIP TCP", op{Kind: "tcp", Dst: "[fd00:96::1]:80", Count: 30},
			flowWant{Servers: addrs(tcp6...), All: true, Peer: "[fd00:96::1]:80"}},
		{"IPv6 UDP unconnected", op{Kind: "udp", Dst: "[fd00:96::1]:53", Count: 30},
			flowWant{Servers: addrs(udp6...), All: true, From: "[fd00:96::1]:53"}},
		{"IPv6 UDP connected", op{Kind: "udpconn", Dst: "[fd00:96::1]:53", Count: 30},
			flowWant{Servers: addrs(udp6...), All: true, Peer: "[fd00:96::1]:53", From: "[fd00:96::1]:53"}},
		{"IPv6 no endpoints", op{Kind: "tcp", Dst: "[fd00:96::2]:80"}, flowWant{Errno: "ECONNREFUSED"}},
		{"IPv6 not a service", op{Kind: "tcp", Dst: "[fd00:96::3]:80"}, flowWant{Errno: "ENETUNREACH"}},
		{"v4-mapped on a dual-stack socket", op{Kind: "tcp", Dst: "[::ffff:10.96.0.10]:80", Count: 30},
			flowWant{Servers: addrs(tcp...), All: true, Peer: "[::ffff:10.96.0.10]:80"}},
		{"v4-mapped UDP connected", op{Kind: "udpconn", Dst: "[::ffff:10.96.0.10]:53", Count: 30},
			flowWant{Servers: addrs(udp...), All: true, Peer: "[::ffff:10.96.0.10]:53", From: "[::ffff:10.96.0.10]:53"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, err := o.Stats()
			if err != nil {
				t.Fatal(err)
			}
			got := runChild(t, cg, ns, tt.op)[0]
			checkFlow(t, got, tt.want)
			after, err := o.Stats()
			if err != nil {
				t.Fatal(err)
			}
			d := Stats{after.Translated - before.Translated, after.Refused - before.Refused, after.Passed - before.Passed}
			n := uint64(len(got))
			switch {
			case tt.want.Errno == "ECONNREFUSED" && d.Refused < n:
				t.Errorf("stats delta %+v, want refused >= %d", d, n)
			case tt.want.Errno == "" && tt.op.Dst != direct.Addr && d.Translated < n:
				t.Errorf("stats delta %+v, want translated >= %d", d, n)
			case tt.want.Errno == "ENETUNREACH" && d.Passed < n:
				t.Errorf("stats delta %+v, want passed >= %d", d, n)
			}
		})
	}
}

func TestIntegrationAffinity(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	srv := startServers(t, ns, "tcp", "127.0.0.1:0", 3)
	mustApply(t, o, Service{ID: 1, Frontends: []Frontend{fe("10.96.1.1:80", TCP)}, Backends: backends(srv...), AffinityTimeout: 300 * time.Millisecond})

	res := runChild(t, cg, ns,
		// Within the timeout (last use refreshes it): one backend.
		op{Kind: "tcp", Dst: "10.96.1.1:80", Count: 20, SleepMs: 20},
		// Idle longer than the timeout before each connect: re-picked.
		op{Kind: "tcp", Dst: "10.96.1.1:80", Count: 15, SleepMs: 400},
	)
	sticky := map[string]bool{}
	for _, a := range res[0] {
		if a.Errno != "" {
			t.Fatalf("connect: %+v", a)
		}
		sticky[a.Server] = true
	}
	if len(sticky) != 1 {
		t.Errorf("within timeout reached %v, want one backend", sticky)
	}
	after := map[string]bool{}
	for _, a := range res[1] {
		after[a.Server] = true
	}
	// 15 independent picks out of 3 all equal has probability 3^-14.
	if len(after) < 2 {
		t.Errorf("after timeouts reached only %v, want re-selection", after)
	}

	// A backend set change invalidates affinity to a removed backend.
	var stuck string
	for s := range sticky {
		stuck = s
	}
	var rest []server
	for _, s := range srv {
		if s.Addr != stuck {
			rest = append(rest, s)
		}
	}
	res = runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.1.1:80"})
	mustApply(t, o, Service{ID: 1, Frontends: []Frontend{fe("10.96.1.1:80", TCP)}, Backends: backends(rest...), AffinityTimeout: time.Hour})
	res = runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.1.1:80", Count: 10})
	checkFlow(t, res[0], flowWant{Servers: addrs(rest...)})
}

func beEntries(t *testing.T, o *Objects) int {
	t.Helper()
	n := 0
	var k SocklbBeKey
	var v SocklbBeVal
	it := o.objs.KebpfLbBe.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestIntegrationApplyUpdateDelete(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	s := startServers(t, ns, "tcp", "127.0.0.1:0", 3)
	f := []Frontend{fe("10.96.2.1:80", TCP)}

	steps := []struct {
		name string
		set  []server // nil + del: Delete
		del  bool
		want flowWant
	}{
		{name: "initial two", set: s[:2], want: flowWant{Servers: addrs(s[:2]...), All: true}},
		{name: "replace with third (generation swap)", set: s[2:], want: flowWant{Servers: addrs(s[2]), All: true}},
		{name: "append first (in place)", set: []server{s[2], s[0]}, want: flowWant{Servers: addrs(s[2], s[0]), All: true}},
		{name: "shrink to prefix (count first)", set: []server{s[2]}, want: flowWant{Servers: addrs(s[2]), All: true}},
		{name: "reorder all three", set: []server{s[1], s[0], s[2]}, want: flowWant{Servers: addrs(s...), All: true}},
		{name: "no endpoints", set: []server{}, want: flowWant{Errno: "ECONNREFUSED"}},
		{name: "endpoints back", set: s[:1], want: flowWant{Servers: addrs(s[0]), All: true}},
		{name: "delete", del: true, want: flowWant{Errno: "ENETUNREACH"}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			want := map[uint32]Service{}
			if st.del {
				if err := o.Delete(1); err != nil {
					t.Fatal(err)
				}
				if err := o.Delete(1); err != nil {
					t.Fatalf("second delete: %v", err)
				}
			} else {
				svc := Service{ID: 1, Frontends: f, Backends: backends(st.set...)}
				mustApply(t, o, svc)
				want[1] = svc
			}
			checkServices(t, o, want)
			if got, n := beEntries(t, o), len(st.set); got != n {
				t.Errorf("backend map holds %d slots, want %d (stale generation left?)", got, n)
			}
			if ff, fb := o.Capacity(); ff != DefaultMaxFrontends-len(want) || fb != DefaultMaxBackends-len(st.set) {
				t.Errorf("capacity = %d, %d", ff, fb)
			}
			checkFlow(t, runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.2.1:80", Count: 30})[0], st.want)
		})
	}
}

func checkServices(t *testing.T, o *Objects, want map[uint32]Service) {
	t.Helper()
	got, err := o.Services()
	if err != nil {
		t.Fatal(err)
	}
	norm := func(m map[uint32]Service) string {
		var ids []int
		for id := range m {
			ids = append(ids, int(id))
		}
		sort.Ints(ids)
		var b strings.Builder
		for _, id := range ids {
			s := m[uint32(id)]
			slices.SortFunc(s.Frontends, compareFrontend)
			if len(s.Backends) == 0 {
				s.Backends = nil
			}
			fmt.Fprintf(&b, "%d %v %v %v\n", id, s.Frontends, s.Backends, s.AffinityTimeout)
		}
		return b.String()
	}
	if g, w := norm(got), norm(want); g != w {
		t.Errorf("Services() =\n%s\nwant\n%s", g, w)
	}
}

func TestIntegrationCapacityExhaustion(t *testing.T) {
	bpftest.RequireRoot(t)
	pinDir := bpftest.PinDir(t)
	o, err := Load(pinDir, LoadOptions{MaxFrontends: 4, MaxBackends: 5})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Detach() })

	b := func(n int) []Backend {
		var bs []Backend
		for i := range n {
			bs = append(bs, Backend{IP: mustAddr("127.0.0.1"), Port: uint16(9000 + i)})
		}
		return bs
	}
	a := Service{ID: 1, Frontends: []Frontend{fe("10.96.3.1:80", TCP), fe("10.96.3.1:443", TCP)}, Backends: b(3)}
	mustApply(t, o, a)
	state := map[uint32]Service{1: a}

	tests := []struct {
		name    string
		svc     Service
		wantErr bool
	}{
		{"too many backends", Service{ID: 2, Frontends: []Frontend{fe("10.96.3.2:80", TCP)}, Backends: b(3)}, true},
		{"fits exactly", Service{ID: 2, Frontends: []Frontend{fe("10.96.3.2:80", TCP)}, Backends: b(2)}, false},
		{"too many frontends", Service{ID: 3, Frontends: []Frontend{fe("10.96.3.3:80", TCP), fe("10.96.3.3:81", TCP)}}, true},
		// Replacing all backends of a full map needs the transient second
		// generation; the kernel map has room for it.
		{"swap generation when full", Service{ID: 1, Frontends: a.Frontends, Backends: []Backend{{IP: mustAddr("127.0.0.2"), Port: 1}, {IP: mustAddr("127.0.0.2"), Port: 2}, {IP: mustAddr("127.0.0.2"), Port: 3}}}, false},
		{"grow existing beyond capacity", Service{ID: 1, Frontends: a.Frontends, Backends: b(4)}, true},
		{"one more frontend fits", Service{ID: 3, Frontends: []Frontend{fe("[fd00:96::3]:80", TCP)}}, false},
		{"then no frontend fits", Service{ID: 4, Frontends: []Frontend{fe("10.96.3.4:80", TCP)}}, true},
		{"moving frontends within a service fits", Service{ID: 1, Frontends: []Frontend{fe("10.96.3.9:80", TCP), fe("10.96.3.9:443", TCP)}, Backends: b(3)}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ff, fb := o.Capacity()
			err := o.Apply(tt.svc)
			if tt.wantErr {
				if !errors.Is(err, ErrFull) {
					t.Fatalf("Apply = %v, want ErrFull", err)
				}
				if ff2, fb2 := o.Capacity(); ff2 != ff || fb2 != fb {
					t.Errorf("capacity changed %d,%d -> %d,%d on a refused Apply", ff, fb, ff2, fb2)
				}
			} else {
				if err != nil {
					t.Fatalf("Apply = %v", err)
				}
				state[tt.svc.ID] = tt.svc
			}
			checkServices(t, o, state)
			used := 0
			for _, s := range state {
				used += len(s.Backends)
			}
			if got := beEntries(t, o); got != used {
				t.Errorf("backend map holds %d slots, want %d", got, used)
			}
		})
	}
}

// TestIntegrationRestartAndDetach: an agent restart keeps translation and
// state (pinned maps and links), re-attaching swaps programs in place, and
// Detach (the live `disable service-lb` switch) leaves nothing behind.
func TestIntegrationRestartAndDetach(t *testing.T) {
	bpftest.RequireRoot(t)
	ns := testNetns(t)
	pinDir := bpftest.PinDir(t)
	cg := bpftest.Cgroup(t)
	t.Cleanup(func() { DetachPinned(pinDir) })
	srv := startServer(t, ns, "tcp", "127.0.0.1:0")
	usrv := startServer(t, ns, "udp", "[::1]:0")
	svcs := map[uint32]Service{
		1: {ID: 1, Frontends: []Frontend{fe("10.96.4.1:80", TCP)}, Backends: backends(srv)},
		2: {ID: 2, Frontends: []Frontend{fe("[fd00:96::4]:53", UDP)}, Backends: backends(usrv), AffinityTimeout: 3 * time.Hour},
		3: {ID: 3, Frontends: []Frontend{fe("10.96.4.3:80", TCP)}},
	}

	first, err := Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { first.Close() })
	if err := first.Attach(cg); err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		mustApply(t, first, s)
	}
	before := bpftest.CgroupProgs(t, cg)
	if len(before) != len(hooks) {
		t.Fatalf("attached %+v, want %d programs", before, len(hooks))
	}
	ff, fb := first.Capacity()
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}

	// Agent gone: pinned links and maps keep translating.
	checkFlow(t, runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.4.1:80", Count: 3})[0], flowWant{Servers: addrs(srv), Peer: "10.96.4.1:80"})

	second, err := Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Close() })
	checkServices(t, second, svcs)
	if ff2, fb2 := second.Capacity(); ff2 != ff || fb2 != fb {
		t.Errorf("capacity after restart %d,%d, want %d,%d", ff2, fb2, ff, fb)
	}
	// An unchanged Apply after restart is a no-op; a changed one works.
	for _, s := range svcs {
		mustApply(t, second, s)
	}
	if err := second.Attach(cg); err != nil {
		t.Fatal(err)
	}
	after := bpftest.CgroupProgs(t, cg)
	if len(after) != len(hooks) {
		t.Fatalf("after re-attach: %+v, want exactly %d programs (links updated, not duplicated)", after, len(hooks))
	}
	oldIDs := map[int]bool{}
	for _, p := range before {
		oldIDs[p.ID] = true
	}
	for _, p := range after {
		if oldIDs[p.ID] {
			t.Errorf("pinned link still runs old program %d (%s)", p.ID, p.Name)
		}
	}
	res := runChild(t, cg, ns,
		op{Kind: "tcp", Dst: "10.96.4.1:80", Count: 3},
		op{Kind: "udpconn", Dst: "[fd00:96::4]:53", Count: 3},
		op{Kind: "tcp", Dst: "10.96.4.3:80"})
	checkFlow(t, res[0], flowWant{Servers: addrs(srv), Peer: "10.96.4.1:80"})
	checkFlow(t, res[1], flowWant{Servers: addrs(usrv), Peer: "[fd00:96::4]:53", From: "[fd00:96::4]:53"})
	checkFlow(t, res[2], flowWant{Errno: "ECONNREFUSED"})

	if err := second.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := bpftest.CgroupProgs(t, cg); len(got) != 0 {
		t.Errorf("after detach: attached = %+v, want none", got)
	}
	paths := MapPinPaths(pinDir)
	for _, h := range Hooks() {
		paths = append(paths, LinkPinPath(pinDir, h))
	}
	for _, p := range paths {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin %s still present after detach (stat err %v)", p, err)
		}
	}
	// Detached means untranslated: the VIP has no route in the netns.
	checkFlow(t, runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.4.1:80"})[0], flowWant{Errno: "ENETUNREACH"})
}

// TestIntegrationUDPSocketDestroy: a connected UDP socket whose backend is
// removed is destroyed by Apply (bpf_sock_destroy from an iter/udp program);
// a socket the app connected to that pod directly is left alone.
func TestIntegrationUDPSocketDestroy(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{DestroyNetns: func() []string { return []string{""} }})
	if err := o.SocketDestroyError(); err != nil {
		t.Fatalf("socket destroy unavailable on a kernel with bpf_sock_destroy: %v", err)
	}
	// Tests sweep the test netns; set after Load like an agent would learn pods.
	o.opts.DestroyNetns = func() []string { return []string{ns} }
	u := startServers(t, ns, "udp", "127.0.0.1:0", 2)
	f := []Frontend{fe("10.96.5.1:53", UDP)}
	mustApply(t, o, Service{ID: 1, Frontends: f, Backends: backends(u...)})

	h := startHold(t, cg, ns, "10.96.5.1:53")
	victim := h.reached
	var keep server
	for _, s := range u {
		if s.Addr != victim {
			keep = s
		}
	}
	if keep.Addr == "" {
		t.Fatalf("child reached %q, not a backend of %v", victim, addrs(u...))
	}

	// Filter check: nothing is connected (via the LB) to the kept backend.
	if n, err := o.DestroySocketsToIn(ns, keep.backend()); err != nil || n != 0 {
		t.Fatalf("DestroySocketsToIn(kept backend) = %d, %v; want 0", n, err)
	}
	mustApply(t, o, Service{ID: 1, Frontends: f, Backends: backends(keep)})
	// Already destroyed by Apply: a second sweep finds nothing.
	vb := server{Addr: victim}.backend()
	if n, err := o.DestroySocketsToIn(ns, vb); err != nil || n != 0 {
		t.Errorf("DestroySocketsToIn(victim) after Apply = %d, %v; want 0 (Apply destroyed it)", n, err)
	}

	checkDestroyed(t, h.release(), victim, keep.Addr)
}

// checkDestroyed checks the state of a holdUDP client after the destroy:
// the LB'd socket reports ECONNABORTED once and is disconnected (sends fail,
// no peer), the socket connected directly to direct still works, and a new
// connect through the LB reaches again.
func checkDestroyed(t *testing.T, x map[string]string, direct, again string) {
	t.Helper()
	if x["s1recv"] != "ECONNABORTED" {
		t.Errorf("recv on the destroyed socket = %s, want ECONNABORTED", x["s1recv"])
	}
	if x["s1send"] == "ok" || x["s1send2"] == "ok" {
		t.Errorf("send on the destroyed socket still succeeds: %v", x)
	}
	if x["s1peer"] != "ENOTCONN" {
		t.Errorf("getpeername on the destroyed socket = %s, want ENOTCONN (disconnected)", x["s1peer"])
	}
	if x["s2send"] != "ok" || x["s2recv"] != direct {
		t.Errorf("socket connected directly to %s was disturbed: %v", direct, x)
	}
	if x["again"] != again {
		t.Errorf("reconnect reached %q, want %s", x["again"], again)
	}
}

func TestIntegrationDestroyCountsDirectly(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	u := startServer(t, ns, "udp", "[::1]:0")
	mustApply(t, o, Service{ID: 1, Frontends: []Frontend{fe("[fd00:96::5]:53", UDP)}, Backends: backends(u)})

	h := startHold(t, cg, ns, "[fd00:96::5]:53")
	n, err := o.DestroySocketsToIn(ns, u.backend())
	if err != nil || n != 1 {
		t.Errorf("DestroySocketsToIn = %d, %v; want exactly the one LB'd socket (not the direct one)", n, err)
	}
	// The backend stays in the service: a reconnect reaches it again.
	checkDestroyed(t, h.release(), u.Addr, u.Addr)
}

// TestProgRunUnsupported documents why flows are tested with real sockets:
// the kernel has no BPF_PROG_TEST_RUN for cgroup sock_addr programs. If a
// future kernel adds it, this fails and a prog.Run table should join.
func TestProgRunUnsupported(t *testing.T) {
	bpftest.RequireRoot(t)
	spec, err := LoadSocklb()
	if err != nil {
		t.Fatal(err)
	}
	delete(spec.Programs, KillProgramName)
	bpftest.ProgRunUnsupported(t, spec, SocklbProgKebpfConnect4)
}

// Every pinned map of the program has an upgrade policy.
func TestMapVersionsCoverSpec(t *testing.T) {
	spec, err := LoadSocklb()
	if err != nil {
		t.Fatal(err)
	}
	if err := pins.CheckTable(spec, mapVersions); err != nil {
		t.Fatal(err)
	}
}
