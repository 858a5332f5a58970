//go:build linux

package netpol

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// Every pinned map of the program has an upgrade policy, and the table
// names no map the program lacks.
func TestMapVersionsCoverSpec(t *testing.T) {
	spec, err := LoadNetpol()
	if err != nil {
		t.Fatal(err)
	}
	if err := pins.CheckTable(spec, mapVersions); err != nil {
		t.Fatal(err)
	}
}

func retrans(t testing.TB, c net.Conn) uint32 {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var serr error
	rc.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if serr != nil {
		t.Fatal(serr)
	}
	return info.Total_retrans
}

// pusher is a server in b that writes a numbered line every 2ms on one
// accepted connection, and a client in a that only reads them: every packet
// from b to a is let in by a's conntrack entry alone (a's ingress is
// default-deny), so the stream stalls the moment that entry is gone.
type pusher struct {
	srv, cli net.Conn
	got      atomic.Int64 // lines read in order
	last     atomic.Int64 // unix nanos of the last line
	err      atomic.Pointer[error]
	stop     chan struct{}
	done     sync.WaitGroup
}

func startPusher(t *testing.T, tp *topo, port int) *pusher {
	t.Helper()
	var l net.Listener
	if err := inNetns(tp.b, func() error {
		var err error
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p := &pusher{stop: make(chan struct{})}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	cli, err := dialOnly(tp.a, hostPort(ipB, port))
	if err != nil {
		t.Fatalf("dial pusher: %v", err)
	}
	p.cli = cli
	select {
	case p.srv = <-accepted:
	case <-time.After(allowWait):
		t.Fatal("pusher: no connection accepted")
	}
	if p.srv == nil {
		t.Fatal("pusher: accept failed")
	}
	t.Cleanup(p.close)
	p.done.Add(2)
	go func() {
		defer p.done.Done()
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			// Blocks (then fails) once the kernel's send buffer fills:
			// the reader side reports the stall.
			p.srv.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := fmt.Fprintf(p.srv, "%d\n", i); err != nil {
				return
			}
		}
	}()
	go func() {
		defer p.done.Done()
		r := bufio.NewReader(p.cli)
		for want := 0; ; want++ {
			line, err := r.ReadString('\n')
			if err != nil {
				p.err.Store(&err)
				return
			}
			if line != fmt.Sprintf("%d\n", want) {
				err := fmt.Errorf("line %q, want %d", line, want)
				p.err.Store(&err)
				return
			}
			p.got.Add(1)
			p.last.Store(time.Now().UnixNano())
		}
	}()
	return p
}

func (p *pusher) close() {
	select {
	case <-p.stop:
		return
	default:
	}
	close(p.stop)
	p.srv.Close()
	p.cli.Close()
	p.done.Wait()
}

// dialOnly connects from netns ns to dst without sending anything.
func dialOnly(ns, dst string) (net.Conn, error) {
	var conn net.Conn
	err := inNetns(ns, func() error {
		c, err := net.DialTimeout("tcp", dst, allowWait)
		conn = c
		return err
	})
	return conn, err
}

// gap is how long the pusher's stream has been silent.
func (p *pusher) gap() time.Duration {
	return time.Since(time.Unix(0, p.last.Load()))
}

// An agent upgrade that grows the conntrack and policy maps (a layout
// change: max_entries) migrates them instead of failing or flushing: an
// established flow whose packets only its conntrack entry admits keeps
// streaming through the switch with no packet dropped, the policy decides
// as before, the old maps are freed once the links run the new programs,
// and nothing stays pinned at a temporary name.
func TestIntegrationUpgradeMigratesMaps(t *testing.T) {
	bpftest.RequireRoot(t)
	for _, mode := range []AttachMode{AttachTCX, AttachClsact} {
		t.Run(mode.String(), func(t *testing.T) { testUpgradeMigratesMaps(t, mode) })
	}
}

func testUpgradeMigratesMaps(t *testing.T, mode AttachMode) {
	tp := newTopo(t)
	serve(t, tp.b)
	serve(t, tp.a)
	pinDir := nodePinDir(t, tp)
	var logs bpftest.LogBuffer
	logger := slog.New(slog.NewTextHandler(io.MultiWriter(&logs, tWriter{t}), nil))

	v1 := LoadOptions{MaxCT: 1024, MaxVerdicts: 1024, MaxPolicyEntries: 64, MaxEndpoints: 16, Attach: mode, Logger: logger}
	v2 := v1
	v2.MaxCT, v2.MaxPolicyEntries = 8192, 512
	load := func(lo LoadOptions) *Objects {
		t.Helper()
		var o *Objects
		if err := inNetns(tp.n, func() error {
			var err error
			o, err = Load(pinDir, lo)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return o
	}

	o1 := load(v1)
	t.Cleanup(func() { o1.Close() })
	if err := o1.SetHostIPs([]netip.Addr{addr(ipNA), addr(ipNB)}); err != nil {
		t.Fatal(err)
	}
	// b: ingress from a on TCP 80 and 82. a: egress to b on TCP 80-82 and
	// UDP 53; ingress default-deny (replies get in by conntrack only).
	applyIn(t, tp, o1, EndpointPolicy{ID: 2, IfIndex: tp.ifB, IPs: []netip.Addr{addr(ipB)}, IngressEnforced: true, DefaultDenyPolicy: 20,
		Ingress: []PeerEntry{peer(ipA+"/32", rule(TCP, 80, 0, 21, 0), rule(TCP, 82, 0, 21, 1))}})
	applyIn(t, tp, o1, EndpointPolicy{ID: 1, IfIndex: tp.ifA, IPs: []netip.Addr{addr(ipA)}, IngressEnforced: true, EgressEnforced: true, DefaultDenyPolicy: 10,
		Egress: []PeerEntry{peer(ipB+"/32", rule(TCP, 80, 82, 11, 0), rule(UDP, 53, 0, 11, 1))}})

	table := []struct {
		name   string
		from   string
		dst    string
		udp    bool
		wantOK bool
	}{
		{"a->b tcp 80 allowed", tp.a, hostPort(ipB, 80), false, true},
		{"a->b tcp 81 denied by b ingress", tp.a, hostPort(ipB, 81), false, false},
		{"a->b udp 53 denied by b ingress", tp.a, hostPort(ipB, 53), true, false},
		{"b->a tcp 80 denied by a ingress", tp.b, hostPort(ipA, 80), false, false},
		{"node->b tcp 81 allowed (host)", tp.n, hostPort(ipB, 81), false, true},
	}
	check := func(when string) {
		t.Helper()
		for _, r := range table {
			wait := allowWait
			if !r.wantOK {
				wait = denyWait
			}
			var got bool
			if r.udp {
				got = probeUDP(t, r.from, r.dst, wait)
			} else {
				got = probeTCP(t, r.from, r.dst, wait)
			}
			if got != r.wantOK {
				t.Errorf("%s: %s: connected=%v, want %v", when, r.name, got, r.wantOK)
			}
		}
	}
	check("before the upgrade")

	// Two established flows: a->b:80 echoing (a speaks first) and b:82
	// pushing to a (b speaks, a only acknowledges).
	est, err := dialTCP(t, tp.a, hostPort(ipB, 80), allowWait)
	if err != nil {
		t.Fatal(err)
	}
	defer est.Close()
	push := startPusher(t, tp, 82)
	var echoes, echoFails atomic.Int64
	stopEcho := make(chan struct{})
	echoDone := make(chan struct{})
	go func() {
		defer close(echoDone)
		for {
			select {
			case <-stopEcho:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if err := echo(est, time.Second); err != nil {
				echoFails.Add(1)
				return
			}
			echoes.Add(1)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if push.got.Load() == 0 || echoes.Load() == 0 {
		t.Fatalf("flows not streaming before the upgrade: %d pushed, %d echoes", push.got.Load(), echoes.Load())
	}

	ctBefore := countKeys(t, o1.objs.KebpfNpCt)
	oldIDs := map[string]ebpf.MapID{
		NetpolMapKebpfNpCt:  bpftest.MapID(t, o1.objs.KebpfNpCt),
		NetpolMapKebpfNpPol: bpftest.MapID(t, o1.objs.KebpfNpPol),
	}
	c1, err := o1.Counters(1)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := o1.Counters(2)
	if err != nil {
		t.Fatal(err)
	}
	// The old agent exits; its programs keep running on the pinned links.
	if err := o1.Close(); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	o2 := load(v2)
	t.Cleanup(func() { o2.Close() })
	t.Logf("upgrade Load took %v; conntrack entries before: %d, after: %d", time.Since(start), ctBefore, countKeys(t, o2.objs.KebpfNpCt))
	time.Sleep(300 * time.Millisecond)

	// Both flows streamed through the switch, with no gap and no drop.
	close(stopEcho)
	<-echoDone
	if echoFails.Load() != 0 {
		t.Errorf("a->b:80 echo failed during the upgrade")
	}
	if e := push.err.Load(); e != nil {
		t.Errorf("b:82 push stream broke: %v", *e)
	}
	if g := push.gap(); g > 100*time.Millisecond {
		t.Errorf("b:82 push stream silent for %v after the upgrade", g)
	}
	if r := retrans(t, est); r != 0 {
		t.Errorf("a->b:80 client retransmitted %d segments: packets were dropped", r)
	}
	if r := retrans(t, push.srv); r != 0 {
		t.Errorf("b:82 server retransmitted %d segments: packets were dropped", r)
	}
	// The established flows were never judged again: no new flow, no
	// drop counted (a flushed conntrack would count the push as a denied
	// new ingress flow of a).
	n1, err := o2.Counters(1)
	if err != nil {
		t.Fatal(err)
	}
	n2, err := o2.Counters(2)
	if err != nil {
		t.Fatal(err)
	}
	if n1.Ingress.Denied != c1.Ingress.Denied || n1.Egress.Denied != c1.Egress.Denied || n2.Ingress.Denied != c2.Ingress.Denied ||
		n1.Egress.Flows != c1.Egress.Flows || n2.Ingress.Flows != c2.Ingress.Flows {
		t.Errorf("counters moved across the upgrade: a %+v -> %+v, b %+v -> %+v", c1, n1, c2, n2)
	}
	t.Logf("through the upgrade: %d echoes, %d pushed lines, 0 retransmits", echoes.Load(), push.got.Load())

	// The new layout is pinned, the old maps are gone (no program holds
	// them: the links run the new programs), no temporary pin is left.
	for name, want := range map[string]uint32{NetpolMapKebpfNpCt: 8192, NetpolMapKebpfNpPol: 512} {
		m, err := ebpf.LoadPinnedMap(MapPinDir(pinDir)+"/"+name, nil)
		if err != nil {
			t.Fatal(err)
		}
		if m.MaxEntries() != want {
			t.Errorf("pinned %s: max_entries %d, want %d", name, m.MaxEntries(), want)
		}
		m.Close()
	}
	for name, id := range oldIDs {
		bpftest.WaitMapFreed(t, name, id)
	}
	ents, err := os.ReadDir(MapPinDir(pinDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), pins.TempPin("")) {
			t.Errorf("temporary pin left: %s", e.Name())
		}
	}
	for _, name := range []string{NetpolMapKebpfNpCt, NetpolMapKebpfNpPol} {
		if !strings.Contains(logs.String(), `msg="pinned map migrated to a new layout" map=`+name) {
			t.Errorf("no migration logged for %s", name)
		}
	}
	if strings.Contains(logs.String(), "map="+NetpolMapKebpfNpEp) || strings.Contains(logs.String(), "recreated empty") {
		t.Errorf("an unchanged map was migrated or recreated:\n%s", logs.String())
	}

	check("after the upgrade")

	// The test can see a flush: emptying conntrack stops the push stream
	// (b's next packet to a is judged as a new ingress flow and denied).
	if err := pins.ClearMap(o2.objs.KebpfNpCt); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if g := push.gap(); g < 200*time.Millisecond {
		t.Errorf("push stream still flowing %v after a conntrack flush: the checks above cannot tell a migration from a flush", g)
	}
}

func countKeys(t testing.TB, m *ebpf.Map) int {
	t.Helper()
	n := 0
	var k []byte
	var v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// tWriter sends log lines to the test log.
type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
