//go:build linux

package sockmap

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSteerAndOrigDst: a client in the app cgroup dialing the pod lands on
// the Envoy stand-in, whose getsockopt(SO_ORIGINAL_DST) names the pod; the
// stand-in (in Envoy's cgroup) dials that and reaches the pod itself.
func TestSteerAndOrigDst(t *testing.T) {
	r := newRig(t)
	client, err := dialFrom(t, r.app, r.podAddr)
	if err != nil {
		t.Fatalf("dial %s from app: %v", r.podAddr, err)
	}
	if got := addrPort(client.RemoteAddr()); got != r.envoyAdr {
		t.Fatalf("client connected to %s, want the envoy listener %s", got, r.envoyAdr)
	}
	ec := accept(t, r.envoyLn)
	got, err := origDst(t, ec)
	if err != nil {
		t.Fatalf("SO_ORIGINAL_DST on envoy's socket: %v", err)
	}
	if got != r.podAddr {
		t.Fatalf("SO_ORIGINAL_DST = %s, want %s", got, r.podAddr)
	}
	if d, ok, err := r.o.OrigDst(Pair{Local: addrPort(ec.LocalAddr()), Remote: addrPort(ec.RemoteAddr())}); err != nil || !ok || d != r.podAddr {
		t.Fatalf("OrigDst map = %s %v %v, want %s", d, ok, err, r.podAddr)
	}

	// Envoy's upstream: same destination from the envoy cgroup goes direct.
	up, err := dialFrom(t, r.envoy, got)
	if err != nil {
		t.Fatalf("envoy upstream dial %s: %v", got, err)
	}
	if ra := addrPort(up.RemoteAddr()); ra != r.podAddr {
		t.Fatalf("envoy upstream connected to %s, want the pod %s (loop)", ra, r.podAddr)
	}
	pc := accept(t, r.pod)
	if addrPort(pc.RemoteAddr()) != addrPort(up.LocalAddr()) {
		t.Fatalf("pod accepted %s, want envoy's upstream %s", pc.RemoteAddr(), up.LocalAddr())
	}

	// A socket that was not steered gets the kernel's answer, not a stale
	// or invented one: the program leaves the call alone.
	// The kernel's answer is an error unless nf_conntrack is loaded on the
	// host (iptables, kube-proxy); then it is the connection's own
	// conntrack entry, whose original destination is this socket's address.
	before := stats(t, r.o)
	if d, err := origDst(t, pc); err == nil && d != addrPort(pc.LocalAddr()) {
		t.Fatalf("SO_ORIGINAL_DST on a socket that was not steered = %s, want an error or conntrack's %s", d, pc.LocalAddr())
	}
	s := stats(t, r.o)
	if s.OrigDst != before.OrigDst {
		t.Fatalf("stats after asking an unsteered socket = %+v (before %+v): the program answered", s, before)
	}
	if s.Steered != 1 || s.EnvoySkipped != 1 || s.OrigDst < 1 {
		t.Fatalf("stats = %+v, want Steered 1, EnvoySkipped 1, OrigDst >= 1", s)
	}
}

// TestGetsockoptOthersUntouched: options other than SO_ORIGINAL_DST on a
// socket the program sees read exactly as on a socket it never sees,
// including a buffer larger than a page (Merbridge clamped optlen there).
func TestGetsockoptOthersUntouched(t *testing.T) {
	r := newRig(t)
	if _, err := dialFrom(t, r.app, r.podAddr); err != nil {
		t.Fatal(err)
	}
	ec := accept(t, r.envoyLn) // in the program's cgroup
	// Reference socket outside every test cgroup.
	refc, err := net.Dial("tcp4", r.envoyAdr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer refc.Close()
	ref := accept(t, r.envoyLn)
	_ = ref
	refc2 := refc.(*net.TCPConn)

	for _, c := range []*net.TCPConn{ec, refc2} {
		if err := c.SetNoDelay(false); err != nil {
			t.Fatal(err)
		}
		if err := c.SetReadBuffer(65536); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name        string
		level, opt  int
		n           int
		compareBody bool
	}{
		{"SO_RCVBUF", unix.SOL_SOCKET, unix.SO_RCVBUF, 4, true},
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 4, true},
		{"TCP_INFO 8k buffer", unix.IPPROTO_TCP, unix.TCP_INFO, 8192, false},
		{"SO_ORIGINAL_DST 4-byte buffer", unix.SOL_IP, soOriginalDst, 4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, gerr := getsockopt(t, ec, tc.level, tc.opt, tc.n)
			want, werr := getsockopt(t, refc2, tc.level, tc.opt, tc.n)
			if !errors.Is(gerr, werr) && (gerr == nil || werr == nil || gerr.Error() != werr.Error()) {
				t.Fatalf("error %v, want %v as outside the cgroup", gerr, werr)
			}
			if len(got) != len(want) {
				t.Fatalf("optlen %d, want %d as outside the cgroup", len(got), len(want))
			}
			if tc.compareBody && !bytes.Equal(got, want) {
				t.Fatalf("value %x, want %x as outside the cgroup", got, want)
			}
		})
	}
}

// TestEnvoyNotSteered: a socket in Envoy's cgroup, or one carrying Envoy's
// mark, reaches the pod directly.
func TestEnvoyNotSteered(t *testing.T) {
	r := newRig(t)
	c, err := dialFrom(t, r.envoy, r.podAddr)
	if err != nil {
		t.Fatal(err)
	}
	if got := addrPort(c.RemoteAddr()); got != r.podAddr {
		t.Fatalf("envoy cgroup connected to %s, want %s", got, r.podAddr)
	}
	accept(t, r.pod)

	// By mark: a socket in the app cgroup with SO_MARK 0x100 set before connect.
	if err := r.o.SetEnvoy(Envoy{Listener: r.envoyAdr, Mark: 0x100}); err != nil {
		t.Fatal(err)
	}
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, 0x100) })
		return serr
	}}
	var mc net.Conn
	inCgroup(t, r.app, func() { mc, err = d.Dial("tcp4", r.podAddr.String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close()
	if got := addrPort(mc.RemoteAddr()); got != r.podAddr {
		t.Fatalf("marked socket connected to %s, want %s", got, r.podAddr)
	}
	accept(t, r.pod)
	if s := stats(t, r.o); s.Steered != 0 || s.EnvoySkipped != 2 {
		t.Fatalf("stats = %+v, want Steered 0, EnvoySkipped 2", s)
	}
}

// TestFailClosed: with no Envoy configured a steered destination is refused
// at connect (EPERM), never reached around Envoy; others are untouched.
func TestFailClosed(t *testing.T) {
	r := newRig(t)
	if err := r.o.SetEnvoy(Envoy{}); err != nil {
		t.Fatal(err)
	}
	_, err := dialFrom(t, r.app, r.podAddr)
	if !errors.Is(err, unix.EPERM) {
		t.Fatalf("dial with no envoy: %v, want EPERM", err)
	}
	other := listen(t, "127.0.0.3:0")
	if _, err := dialFrom(t, r.app, addrPort(other.Addr())); err != nil {
		t.Fatalf("dial an unselected destination: %v", err)
	}
	if err := r.o.DeleteSteered(r.podAddr); err != nil {
		t.Fatal(err)
	}
	if _, err := dialFrom(t, r.app, r.podAddr); err != nil {
		t.Fatalf("dial after DeleteSteered: %v", err)
	}
	if s := stats(t, r.o); s.NoEnvoy != 1 {
		t.Fatalf("stats = %+v, want NoEnvoy 1", s)
	}
}

// pair is a steered client and Envoy's accepted end.
func steeredPair(t *testing.T, r *rig) (client, envoy *net.TCPConn) {
	t.Helper()
	c, err := dialFrom(t, r.app, r.podAddr)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn), accept(t, r.envoyLn)
}

func sameSet(a, b []Pair) bool {
	key := func(p Pair) string { return p.Local.String() + ">" + p.Remote.String() }
	ka, kb := make([]string, len(a)), make([]string, len(b))
	for i := range a {
		ka[i] = key(a[i])
	}
	for i := range b {
		kb[i] = key(b[i])
	}
	slices.Sort(ka)
	slices.Sort(kb)
	return slices.Equal(ka, kb)
}

// TestPayload carries 16 MiB each way at once, then half-closes, then many
// small writes, all through sk_msg; every read blocks with a deadline so a
// lost wakeup (L7-FACTS: 6.18 FIONREAD/read-wakeup regression) fails
// instead of hanging.
func TestPayload(t *testing.T) {
	r := newRig(t)
	client, envoy := steeredPair(t, r)
	want := []Pair{
		{Local: addrPort(client.LocalAddr()), Remote: addrPort(client.RemoteAddr())},
		{Local: addrPort(envoy.LocalAddr()), Remote: addrPort(envoy.RemoteAddr())},
	}
	socks, err := r.o.Sockets()
	if err != nil {
		t.Fatal(err)
	}
	if !sameSet(socks, want) {
		t.Fatalf("SOCKHASH = %v, want both ends %v", socks, want)
	}
	deadline := time.Now().Add(60 * time.Second)
	client.SetDeadline(deadline)
	envoy.SetDeadline(deadline)

	const big = 16 << 20
	up, down := randBytes(big, 1), randBytes(big, 2)
	errc := make(chan error, 4)
	var gotUp, gotDown []byte
	go func() { _, err := client.Write(up); errc <- err }()
	go func() { _, err := envoy.Write(down); errc <- err }()
	go func() { var err error; gotUp, err = readN(envoy, big); errc <- err }()
	go func() { var err error; gotDown, err = readN(client, big); errc <- err }()
	for range 4 {
		if err := <-errc; err != nil {
			t.Fatalf("bulk transfer: %v", err)
		}
	}
	if sha256.Sum256(gotUp) != sha256.Sum256(up) || sha256.Sum256(gotDown) != sha256.Sum256(down) {
		t.Fatal("bulk payload corrupted")
	}
	afterBulk := stats(t, r.o)
	if afterBulk.Redirected == 0 {
		t.Fatalf("stats = %+v: payload did not go through sk_msg", afterBulk)
	}

	// Many small writes from the client, then half-close: Envoy reads all
	// of it and EOF, and can still answer.
	rng := rand.New(rand.NewPCG(3, 4))
	var small bytes.Buffer
	go func() {
		for range 5000 {
			b := randBytes(1+rng.IntN(200), rng.Uint64())
			small.Write(b)
			if _, err := client.Write(b); err != nil {
				errc <- err
				return
			}
		}
		errc <- client.CloseWrite()
	}()
	all, err := io.ReadAll(envoy)
	if err != nil {
		t.Fatalf("read small writes to EOF: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("small writes: %v", err)
	}
	if !bytes.Equal(all, small.Bytes()) {
		t.Fatalf("small writes: got %d bytes, want %d, or content differs", len(all), small.Len())
	}
	reply := []byte("after half-close")
	if _, err := envoy.Write(reply); err != nil {
		t.Fatal(err)
	}
	envoy.CloseWrite()
	rest, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(rest, reply) {
		t.Fatalf("reply after half-close = %q, %v", rest, err)
	}
	s := stats(t, r.o)
	if s.Redirected < afterBulk.Redirected+5000 {
		t.Fatalf("stats = %+v: small writes not redirected (bulk left %d)", s, afterBulk.Redirected)
	}
	t.Logf("stats %+v", s)

	client.Close()
	envoy.Close()
	waitFor(t, "SOCKHASH empty after close", func() bool {
		socks, err := r.o.Sockets()
		return err == nil && len(socks) == 0
	})
	waitFor(t, "original destination dropped after close", func() bool {
		_, ok, err := r.o.OrigDst(want[1])
		return err == nil && !ok
	})
}

// TestFIONREAD: after a redirected write the reader's FIONREAD counts it
// (the 6.18 regression misreports it for sockets in a sockhash).
func TestFIONREAD(t *testing.T) {
	r := newRig(t)
	client, envoy := steeredPair(t, r)
	if _, err := client.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	rc, _ := envoy.SyscallConn()
	var n int
	waitFor(t, "FIONREAD 1000", func() bool {
		rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		return n == 1000
	})
	if s := stats(t, r.o); s.Redirected == 0 {
		t.Fatalf("stats = %+v: not redirected", s)
	}
}

func randBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i+8 <= n; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func readN(c net.Conn, n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	return b, err
}

// TestAttachIdempotent: a second Load+Attach (an agent restart) reuses the
// pinned links and maps; Detach leaves nothing.
func TestAttachIdempotent(t *testing.T) {
	r := newRig(t)
	o2, err := Load(r.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer o2.Close()
	if err := o2.Attach(r.cg); err != nil {
		t.Fatalf("re-attach: %v", err)
	}
	steered, err := o2.Steered()
	if err != nil || len(steered) != 1 || steered[0] != r.podAddr {
		t.Fatalf("steered after restart = %v, %v", steered, err)
	}
	if _, err := dialFrom(t, r.app, r.podAddr); err != nil {
		t.Fatal(err)
	}
	accept(t, r.envoyLn)
	if s := stats(t, o2); s.Steered != 1 {
		t.Fatalf("stats = %+v: want one steered connect (one attachment)", s)
	}
	if err := o2.Detach(); err != nil {
		t.Fatal(err)
	}
	c, err := dialFrom(t, r.app, r.podAddr)
	if err != nil {
		t.Fatal(err)
	}
	if got := addrPort(c.RemoteAddr()); got != r.podAddr {
		t.Fatalf("after Detach connected to %s, want %s", got, r.podAddr)
	}
	accept(t, r.pod)

}

// TestMappedNotBypassed: an AF_INET6 socket connecting to the pod's
// v4-mapped address is steered too, and its payload goes through sk_msg.
func TestMappedNotBypassed(t *testing.T) {
	r := newRig(t)
	c, err := dialMapped(t, r.app, r.podAddr)
	if err != nil {
		t.Fatalf("dial ::ffff:%s: %v", r.podAddr, err)
	}
	ec := accept(t, r.envoyLn)
	if got, err := origDst(t, ec); err != nil || got != r.podAddr {
		t.Fatalf("SO_ORIGINAL_DST = %s, %v; want %s", got, err, r.podAddr)
	}
	msg := []byte("through sk_msg")
	c.SetDeadline(time.Now().Add(10 * time.Second))
	ec.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got, err := readN(ec, len(msg))
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read %q, %v", got, err)
	}
	if s := stats(t, r.o); s.Steered != 1 || s.SockAdded != 2 || s.Redirected != 1 {
		t.Fatalf("stats = %+v, want Steered 1, SockAdded 2, Redirected 1", s)
	}
}

// TestIPv6: an IPv6 pod is steered to Envoy's IPv6 listener, Envoy reads
// it through (SOL_IPV6, IP6T_SO_ORIGINAL_DST) while (SOL_IP,
// SO_ORIGINAL_DST) keeps the kernel's error, the payload goes through
// sk_msg, and Envoy's own connect reaches the pod.
func TestIPv6(t *testing.T) {
	r := newRig(t)
	pod := listen6(t)
	podAddr := addrPort(pod.Addr())
	var envLn net.Listener
	inCgroup(t, r.envoy, func() { envLn = listen6(t) })
	if err := r.o.SetEnvoy(Envoy{Listener: r.envoyAdr, Listener6: addrPort(envLn.Addr())}); err != nil {
		t.Fatal(err)
	}
	if err := r.o.SetSteered(podAddr); err != nil {
		t.Fatal(err)
	}
	var (
		c   net.Conn
		err error
	)
	inCgroup(t, r.app, func() { c, err = net.DialTimeout("tcp6", podAddr.String(), 5*time.Second) })
	if err != nil {
		t.Fatalf("dial %s: %v", podAddr, err)
	}
	defer c.Close()
	if got := addrPort(c.RemoteAddr()); got != addrPort(envLn.Addr()) {
		t.Fatalf("connected to %s, want envoy's %s", got, envLn.Addr())
	}
	ec := accept(t, envLn)
	if got, err := origDst6(t, ec); err != nil || got != podAddr {
		t.Fatalf("IP6T_SO_ORIGINAL_DST = %s, %v; want %s", got, err, podAddr)
	}
	if _, err := origDst(t, ec); err == nil {
		t.Fatal("SOL_IP SO_ORIGINAL_DST answered for an IPv6 destination")
	}
	up, down := randBytes(1<<20, 5), randBytes(1<<20, 6)
	deadline := time.Now().Add(30 * time.Second)
	c.SetDeadline(deadline)
	ec.SetDeadline(deadline)
	errc := make(chan error, 2)
	go func() { _, err := c.Write(up); errc <- err }()
	go func() { _, err := ec.Write(down); errc <- err }()
	gotUp, err := readN(ec, len(up))
	if err != nil || !bytes.Equal(gotUp, up) {
		t.Fatalf("client->envoy: %v", err)
	}
	gotDown, err := readN(c, len(down))
	if err != nil || !bytes.Equal(gotDown, down) {
		t.Fatalf("envoy->client: %v", err)
	}
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	socks, err := r.o.Sockets()
	if err != nil || len(socks) != 2 {
		t.Fatalf("SOCKHASH = %v, %v; want both ends", socks, err)
	}
	uc, err := dialFrom(t, r.envoy, podAddr)
	if err != nil || addrPort(uc.RemoteAddr()) != podAddr {
		t.Fatalf("envoy's own connect: %v", err)
	}
	accept(t, pod)
	s := stats(t, r.o)
	if s.Steered != 1 || s.Redirected == 0 || s.RedirectMiss != 0 || s.EnvoySkipped != 1 {
		t.Fatalf("stats = %+v", s)
	}
}

func listen6(tb testing.TB) net.Listener {
	tb.Helper()
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}
