//go:build linux

package sockmap

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// readEvents returns the records in the ring buffer now (waiting up to 2 s
// for the first want of them).
func readEvents(t *testing.T, o *Objects, want int) []Event {
	t.Helper()
	rd, err := ringbuf.NewReader(o.EventsMap())
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	var out []Event
	for {
		wait := 2 * time.Second
		if len(out) >= want {
			wait = 100 * time.Millisecond // anything more than expected
		}
		rd.SetDeadline(time.Now().Add(wait))
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		ev, err := ParseEvent(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
}

// TestEvents: a steered connect, a connect from a bound socket, Envoy's
// own connect and a fail-closed refusal, made by this process from real
// sockets in test cgroups: exactly one record per steered or refused
// connect, with this process's pid, command and cgroup and the original
// destination; Envoy's own connect leaves none.
func TestEvents(t *testing.T) {
	r := newRig(t)
	comm, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		t.Fatal(err)
	}
	wantComm := string(comm[:len(comm)-1])
	appCg := cgroupID(t, r.app)

	if _, err := dialFrom(t, r.app, r.podAddr); err != nil {
		t.Fatal(err)
	}
	// A socket bound before connect() names its source.
	var bound netip.AddrPort
	inCgroup(t, r.app, func() {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.5")}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp4", r.podAddr.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		bound = addrPort(c.LocalAddr())
	})
	if _, err := dialFrom(t, r.envoy, r.podAddr); err != nil { // Envoy's upstream: not steered, not recorded
		t.Fatal(err)
	}
	if err := r.o.SetEnvoy(Envoy{}); err != nil {
		t.Fatal(err)
	}
	if _, err := dialFrom(t, r.app, r.podAddr); !errors.Is(err, unix.EPERM) {
		t.Fatalf("dial with no envoy: %v, want EPERM", err)
	}

	evs := readEvents(t, r.o, 3)
	if len(evs) != 3 {
		t.Fatalf("%d events, want 3 (steered, steered bound, refused): %+v", len(evs), evs)
	}
	for i, want := range []struct {
		verdict uint8
		src     netip.AddrPort
	}{{EventSteered, netip.AddrPort{}}, {EventSteered, bound}, {EventNoEnvoy, netip.AddrPort{}}} {
		e := evs[i]
		if e.Verdict != want.verdict || e.Dst != r.podAddr || e.Src != want.src {
			t.Errorf("event %d: verdict %d dst %v src %v, want %d %v %v", i, e.Verdict, e.Dst, e.Src, want.verdict, r.podAddr, want.src)
		}
		if e.TGID != uint32(os.Getpid()) || e.PID == 0 || e.Comm != wantComm || e.CgroupID != appCg {
			t.Errorf("event %d: process tgid %d pid %d comm %q cgroup %d, want tgid %d comm %q cgroup %d (%s)",
				i, e.TGID, e.PID, e.Comm, e.CgroupID, os.Getpid(), wantComm, appCg, filepath.Base(r.app))
		}
		if e.At <= 0 {
			t.Errorf("event %d: no timestamp", i)
		}
	}
	if n, err := r.o.EventsLost(); err != nil || n != 0 {
		t.Errorf("lost %d (%v), want 0", n, err)
	}
}

// TestEventsLost: a full ring buffer costs events, never connects; each
// lost event is counted.
func TestEventsLost(t *testing.T) {
	r := newRig(t)
	// 256 KiB of 80-byte records (+8 bytes of header each): ~2,978 fit.
	const n = 3500
	for i := 0; i < n; i++ {
		c, err := dialFrom(t, r.app, r.podAddr)
		if err != nil {
			t.Fatalf("connect %d: %v", i, err)
		}
		c.Close()
		accept(t, r.envoyLn).Close()
	}
	got := len(readEvents(t, r.o, 1))
	lost, err := r.o.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d connects: %d events in the ring, %d lost", n, got, lost)
	if lost == 0 || uint64(got)+lost != n {
		t.Fatalf("%d events + %d lost, want %d in all with some lost", got, lost, n)
	}
}
