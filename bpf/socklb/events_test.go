//go:build linux

package socklb

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// runChildPID is runChild that also returns the client's PID.
func runChildPID(tb testing.TB, cgroup, netns string, ops ...op) ([][]attempt, int) {
	tb.Helper()
	cmd, done := childCmd(tb, cgroup, childReq{Netns: netns, Ops: ops})
	defer done()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	var res [][]attempt
	derr := json.NewDecoder(stdout).Decode(&res)
	if err := cmd.Wait(); err != nil || derr != nil {
		tb.Fatalf("child %+v: %v %v\n%s", ops, err, derr, stderr.String())
	}
	return res, cmd.Process.Pid
}

// cgroupID is the cgroup v2 id of dir: its inode number.
func cgroupID(tb testing.TB, dir string) uint64 {
	tb.Helper()
	fi, err := os.Stat(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func eventReader(tb testing.TB, o *Objects) *ringbuf.Reader {
	tb.Helper()
	rd, err := ringbuf.NewReader(o.EventsMap())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { rd.Close() })
	return rd
}

// readEvents returns every event that arrives within wait.
func readEvents(tb testing.TB, rd *ringbuf.Reader, wait time.Duration) []Event {
	tb.Helper()
	var out []Event
	rd.SetDeadline(time.Now().Add(wait))
	for {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			tb.Fatal(err)
		}
		ev, err := ParseEvent(rec.RawSample)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, ev)
	}
}

// TestIntegrationTraceEvents: real clients in the test cgroup; each LB
// decision writes exactly one event naming the service, the backend, and
// the calling process.
func TestIntegrationTraceEvents(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	if on, err := o.Tracing(); err != nil || !on {
		t.Fatalf("Tracing() = %v, %v on fresh maps; want on", on, err)
	}
	srv := startServers(t, ns, "tcp", "127.0.0.1:0", 2)
	usrv := startServer(t, ns, "udp", "127.0.0.1:0")
	srv6 := startServer(t, ns, "tcp", "[::1]:0")
	mustApply(t, o, Service{ID: 11, Frontends: []Frontend{fe("10.96.7.1:80", TCP)}, Backends: backends(srv...)})
	mustApply(t, o, Service{ID: 12, Frontends: []Frontend{fe("10.96.7.2:80", TCP)}})
	mustApply(t, o, Service{ID: 13, Frontends: []Frontend{fe("10.96.7.3:53", UDP)}, Backends: backends(usrv)})
	mustApply(t, o, Service{ID: 14, Frontends: []Frontend{fe("[fd00:96::7]:80", TCP)}, Backends: backends(srv6)})
	rd := eventReader(t, o)
	cgid := cgroupID(t, cg)

	check := func(t *testing.T, evs []Event, pid int, want Event) {
		t.Helper()
		if len(evs) != 1 {
			t.Fatalf("got %d events, want exactly 1: %+v", len(evs), evs)
		}
		ev := evs[0]
		if ev.PID != uint32(pid) || ev.TID == 0 {
			t.Errorf("pid/tid = %d/%d, want pid %d", ev.PID, ev.TID, pid)
		}
		if want := filepath.Base(os.Args[0]); len(want) > 15 && ev.Comm != want[:15] || len(want) <= 15 && ev.Comm != want {
			t.Errorf("comm = %q, want %q", ev.Comm, filepath.Base(os.Args[0]))
		}
		if ev.CgroupID != cgid {
			t.Errorf("cgroup id = %d, want %d (the test cgroup)", ev.CgroupID, cgid)
		}
		if ev.Cookie == 0 || ev.At <= 0 || ev.At > monotonicNow(t) {
			t.Errorf("cookie %d, at %v: want a socket cookie and a past CLOCK_MONOTONIC time", ev.Cookie, ev.At)
		}
		if ev.ServiceID != want.ServiceID || ev.Verdict != want.Verdict || ev.Hook != want.Hook ||
			ev.Proto != want.Proto || ev.Frontend != want.Frontend || ev.Backend != want.Backend {
			t.Errorf("event %+v\nwant  %+v", ev, want)
		}
	}

	t.Run("connect translated", func(t *testing.T) {
		res, pid := runChildPID(t, cg, ns, op{Kind: "tcp", Dst: "10.96.7.1:80"})
		reached := netip.MustParseAddrPort(res[0][0].Server)
		check(t, readEvents(t, rd, 300*time.Millisecond), pid, Event{ServiceID: 11, Verdict: VerdictTranslated,
			Hook: HookConnect, Proto: TCP, Frontend: netip.MustParseAddrPort("10.96.7.1:80"), Backend: reached})
	})
	t.Run("no endpoints refused", func(t *testing.T) {
		_, pid := runChildPID(t, cg, ns, op{Kind: "tcp", Dst: "10.96.7.2:80"})
		check(t, readEvents(t, rd, 300*time.Millisecond), pid, Event{ServiceID: 12, Verdict: VerdictRefused,
			Hook: HookConnect, Proto: TCP, Frontend: netip.MustParseAddrPort("10.96.7.2:80")})
	})
	t.Run("v4-mapped connect reports IPv4", func(t *testing.T) {
		res, pid := runChildPID(t, cg, ns, op{Kind: "tcp", Dst: "[::ffff:10.96.7.1]:80"})
		reached := netip.MustParseAddrPort(res[0][0].Server)
		check(t, readEvents(t, rd, 300*time.Millisecond), pid, Event{ServiceID: 11, Verdict: VerdictTranslated,
			Hook: HookConnect, Proto: TCP, Frontend: netip.MustParseAddrPort("10.96.7.1:80"), Backend: reached})
	})
	t.Run("IPv6 translated", func(t *testing.T) {
		_, pid := runChildPID(t, cg, ns, op{Kind: "tcp", Dst: "[fd00:96::7]:80"})
		check(t, readEvents(t, rd, 300*time.Millisecond), pid, Event{ServiceID: 14, Verdict: VerdictTranslated,
			Hook: HookConnect, Proto: TCP, Frontend: netip.MustParseAddrPort("[fd00:96::7]:80"), Backend: netip.MustParseAddrPort(srv6.Addr)})
	})
	t.Run("unconnected UDP: one event per socket and backend, not per datagram", func(t *testing.T) {
		// op udp opens one socket per attempt: 1 socket, 5 datagrams.
		_, pid := runChildPID(t, cg, ns, op{Kind: "udpmany", Dst: "10.96.7.3:53", Count: 5})
		check(t, readEvents(t, rd, 300*time.Millisecond), pid, Event{ServiceID: 13, Verdict: VerdictTranslated,
			Hook: HookSendmsg, Proto: UDP, Frontend: netip.MustParseAddrPort("10.96.7.3:53"), Backend: netip.MustParseAddrPort(usrv.Addr)})
	})
	t.Run("switch off: nothing", func(t *testing.T) {
		if err := o.SetTrace(false); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { o.SetTrace(true) })
		if on, _ := o.Tracing(); on {
			t.Fatal("Tracing() still on")
		}
		lost0, _ := o.EventsLost()
		runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.7.1:80", Count: 5}, op{Kind: "tcp", Dst: "10.96.7.2:80", Count: 5})
		if evs := readEvents(t, rd, 300*time.Millisecond); len(evs) != 0 {
			t.Errorf("tracing off wrote %d events: %+v", len(evs), evs)
		}
		if lost, _ := o.EventsLost(); lost != lost0 {
			t.Errorf("tracing off counted %d lost", lost-lost0)
		}
		// And back on.
		if err := o.SetTrace(true); err != nil {
			t.Fatal(err)
		}
		runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.7.1:80"})
		if evs := readEvents(t, rd, 300*time.Millisecond); len(evs) != 1 {
			t.Errorf("tracing on again: %d events, want 1", len(evs))
		}
	})
}

// monotonicNow reads CLOCK_MONOTONIC, bpf_ktime_get_ns's clock.
func monotonicNow(t *testing.T) time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ts.Nano())
}

// TestIntegrationTraceLost: with the ring full (nobody reading) each
// further decision is counted in kebpf_lb_lost: written + lost = decisions.
func TestIntegrationTraceLost(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{EventsBytes: 4096}) // the smallest ring: 39 records
	srv := startServer(t, ns, "tcp", "127.0.0.1:0")
	mustApply(t, o, Service{ID: 1, Frontends: []Frontend{fe("10.96.8.1:80", TCP)}, Backends: backends(srv)})
	lost0, err := o.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	runChild(t, cg, ns, op{Kind: "bench-tcp", Dst: "10.96.8.1:80", Count: n})
	lost, err := o.EventsLost()
	if err != nil {
		t.Fatal(err)
	}
	got := readEvents(t, eventReader(t, o), 200*time.Millisecond)
	if lost-lost0 == 0 || uint64(len(got))+lost-lost0 != n {
		t.Errorf("%d events read + %d lost, want > 0 lost and a sum of %d", len(got), lost-lost0, n)
	}
}

// TestIntegrationTraceDestroyed: the UDP socket destroyed because its
// backend left the service is one event naming the service, the backend
// and the cgroup of the socket's owner.
func TestIntegrationTraceDestroyed(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	if err := o.SocketDestroyError(); err != nil {
		t.Skipf("socket destroy unavailable: %v", err)
	}
	o.opts.DestroyNetns = func() []string { return []string{ns} }
	u := startServers(t, ns, "udp", "127.0.0.1:0", 2)
	f := []Frontend{fe("10.96.9.1:53", UDP)}
	mustApply(t, o, Service{ID: 21, Frontends: f, Backends: backends(u...)})
	h := startHold(t, cg, ns, "10.96.9.1:53")
	rd := eventReader(t, o)
	readEvents(t, rd, 100*time.Millisecond) // the hold's own connects
	var keep server
	for _, s := range u {
		if s.Addr != h.reached {
			keep = s
		}
	}
	mustApply(t, o, Service{ID: 21, Frontends: f, Backends: backends(keep)})
	evs := readEvents(t, rd, 300*time.Millisecond)
	h.release()
	if len(evs) != 1 {
		t.Fatalf("got %d events, want 1 destroyed: %+v", len(evs), evs)
	}
	ev := evs[0]
	want := Event{ServiceID: 21, Verdict: VerdictDestroyed, Hook: HookIter, Proto: UDP,
		Frontend: netip.MustParseAddrPort("10.96.9.1:53"), Backend: netip.MustParseAddrPort(h.reached)}
	if ev.ServiceID != want.ServiceID || ev.Verdict != want.Verdict || ev.Hook != want.Hook || ev.Proto != want.Proto ||
		ev.Frontend != want.Frontend || ev.Backend != want.Backend || ev.PID != 0 || ev.Comm != "" {
		t.Errorf("event %+v\nwant  %+v", ev, want)
	}
	if id := cgroupID(t, cg); ev.CgroupID != id {
		t.Errorf("cgroup id %d, want the socket owner's %d", ev.CgroupID, id)
	}
}
