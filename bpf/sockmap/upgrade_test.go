//go:build linux

package sockmap

import (
	"bufio"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// An upgrade whose SOCKHASH layout changed (here: its size) recreates it
// empty, with a warning: sockets cannot be copied from user space. A
// steered pair the old agent set up keeps exchanging data through the
// switch (every echo answered, in order) and stays in the old SOCKHASH,
// which the kernel frees when that pair closes; new pairs go into the new
// SOCKHASH and are redirected there.
func TestUpgradeRecreatesSockhash(t *testing.T) {
	bpftest.RequireRoot(t)
	var logs bpftest.LogBuffer
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, nil)))
	t.Cleanup(func() { slog.SetDefault(prev) })

	r := &rig{pinDir: bpftest.PinDir(t), cg: bpftest.Cgroup(t)}
	r.app = subCgroup(t, r.cg, "app")
	r.envoy = subCgroup(t, r.cg, "envoy")
	old, err := load(r.pinDir, func(s *ebpf.CollectionSpec) { s.Maps[SockmapMapKebpfL7Socks].MaxEntries = 1024 })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.Close() })
	if err := old.Attach(r.cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := DetachPinned(r.pinDir); err != nil {
			t.Errorf("detach pinned: %v", err)
		}
	})
	r.pod = listen(t, "127.0.0.2:0")
	r.podAddr = addrPort(r.pod.Addr())
	inCgroup(t, r.envoy, func() { r.envoyLn = listen(t, "127.0.0.1:0") })
	r.envoyAdr = addrPort(r.envoyLn.Addr())
	r.program(t, old)

	// A steered pair (app client <-> Envoy stand-in), echoing lines.
	pair := func(o *Objects) (net.Conn, *net.TCPConn) {
		t.Helper()
		c, err := dialFrom(t, r.app, r.podAddr)
		if err != nil {
			t.Fatal(err)
		}
		if got := addrPort(c.RemoteAddr()); got != r.envoyAdr {
			t.Fatalf("client connected to %s, want envoy %s", got, r.envoyAdr)
		}
		ec := accept(t, r.envoyLn)
		go func() {
			br := bufio.NewReader(ec)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				if _, err := ec.Write([]byte(line)); err != nil {
					return
				}
			}
		}()
		return c, ec
	}
	echo := func(c net.Conn, br *bufio.Reader, i int) error {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		want := fmt.Sprintf("%d\n", i)
		if _, err := c.Write([]byte(want)); err != nil {
			return err
		}
		got, err := br.ReadString('\n')
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("echo %q, want %q", got, want)
		}
		return nil
	}
	c1, ec1 := pair(old)
	br1 := bufio.NewReader(c1)
	for i := range 10 {
		if err := echo(c1, br1, i); err != nil {
			t.Fatal(err)
		}
	}
	if s := stats(t, old); s.Redirected == 0 {
		t.Fatalf("the old pair was not redirected by sk_msg: %+v", s)
	}
	oldSocks := bpftest.MapID(t, old.objs.KebpfL7Socks)

	// The pair echoes through the whole upgrade.
	var echoes atomic.Int64
	var echoErr atomic.Pointer[error]
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 10; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := echo(c1, br1, i); err != nil {
				echoErr.Store(&err)
				return
			}
			echoes.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	o, err := Load(r.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	if err := o.Attach(r.cg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-done
	if e := echoErr.Load(); e != nil {
		t.Fatalf("the old pair broke during the upgrade after %d echoes: %v", echoes.Load(), *e)
	}
	t.Logf("old pair: %d echoes through the upgrade", echoes.Load())
	if !strings.Contains(logs.String(), `msg="pinned map recreated empty after a layout change: its state is lost" map=`+SockmapMapKebpfL7Socks) {
		t.Errorf("no recreate warning for %s:\n%s", SockmapMapKebpfL7Socks, logs.String())
	}
	t.Logf("logs:\n%s", logs.String())
	if o.objs.KebpfL7Socks.MaxEntries() == 1024 {
		t.Fatal("the SOCKHASH was not replaced")
	}

	// A new pair lands in the new SOCKHASH and is redirected there.
	before := stats(t, o).Redirected
	c2, _ := pair(o)
	br2 := bufio.NewReader(c2)
	for i := range 10 {
		if err := echo(c2, br2, i); err != nil {
			t.Fatal(err)
		}
	}
	if s := stats(t, o); s.Redirected <= before {
		t.Errorf("the new pair was not redirected: %+v", s)
	}
	if n := entries(t, o.objs.KebpfL7Socks); n < 2 {
		t.Errorf("new SOCKHASH holds %d sockets, want the new pair's 2", n)
	}
	// The old pair's sockets still hold the old sk_msg program (their
	// psocks took a reference), which holds the old SOCKHASH: it lives,
	// redirecting that pair, until the pair closes.
	if m, err := ebpf.NewMapFromID(oldSocks); err != nil {
		t.Errorf("old SOCKHASH gone while its pair is open: %v", err)
	} else {
		if n := entries(t, m); n != 2 {
			t.Errorf("old SOCKHASH holds %d sockets, want the old pair's 2", n)
		}
		m.Close()
	}
	c1.Close()
	ec1.Close()
	bpftest.WaitMapFreed(t, SockmapMapKebpfL7Socks, oldSocks)
	ents, err := os.ReadDir(MapPinDir(r.pinDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), pins.TempPin("")) {
			t.Errorf("temporary pin left: %s", e.Name())
		}
	}
}
