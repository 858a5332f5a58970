//go:build linux

package sockmap

import (
	"errors"
	"net"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// BenchmarkSteeredConnect: connect() + accept + close of a steered
// connection to the Envoy stand-in, with kebpf_l7_events read by a
// reader as the agent does (each connect writes one record). Compared
// with the same benchmark on a tree without the events ring for the
// tracing cost (bpf/sockmap README). Run with -bench under the root lock.
func BenchmarkSteeredConnect(b *testing.B) {
	r := newRig(b)
	rd, err := ringbuf.NewReader(r.o.EventsMap())
	if err != nil {
		b.Fatal(err)
	}
	defer rd.Close()
	go func() { // as the agent's reader: woken at 32 KiB, else polling
		var rec ringbuf.Record
		for {
			rd.SetDeadline(time.Now().Add(EventsPoll))
			if err := rd.ReadInto(&rec); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return
			}
		}
	}()
	go func() {
		for {
			c, err := r.envoyLn.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	// The kernel's run time of the connect4 program itself, free of the
	// shared machine's noise around it (BPF_ENABLE_STATS while this runs).
	st, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	before, err := r.o.objs.KebpfL7Conn4.Stats()
	if err != nil {
		b.Fatal(err)
	}
	inCgroup(b, r.app, func() {
		b.ResetTimer()
		for range b.N {
			c, err := net.Dial("tcp4", r.podAddr.String())
			if err != nil {
				b.Fatal(err)
			}
			c.(*net.TCPConn).SetLinger(0) // RST: no TIME_WAIT pile-up
			c.Close()
		}
	})
	b.StopTimer()
	after, err := r.o.objs.KebpfL7Conn4.Stats()
	if err != nil {
		b.Fatal(err)
	}
	if n := after.RunCount - before.RunCount; n > 0 {
		b.ReportMetric(float64(after.Runtime-before.Runtime)/float64(n), "conn4-ns/run")
	}
	lost, _ := r.o.EventsLost()
	b.ReportMetric(float64(lost), "lost")
}
