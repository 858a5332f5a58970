//go:build linux

package trace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// PollEvery is how often a reader looks at its ring buffer without being
// woken: datapaths that submit without a wakeup (socklb does, below a
// quarter full) are read at least this often, well within the second a
// following client should see an event in.
const PollEvery = 100 * time.Millisecond

// ringReader is the loop every datapath reader shares: read a BPF ring
// buffer into the hub, and report what the datapath counted as lost
// because the ring was full. Only the decoding differs (handle).
type ringReader struct {
	typ       string // event type: losses are reported for it
	events    *ebpf.Map
	lost      func() (uint64, error)
	lostEvery time.Duration
	hub       *Hub
	log       *slog.Logger
	// handle turns one record into zero or one event; clk converts the
	// record's CLOCK_MONOTONIC time to wall time.
	handle func(raw []byte, clk clock) (apiv1.TraceEvent, error)
}

// run reads until ctx ends. Nothing here blocks the datapath: a slow
// reader fills the ring buffer, and the datapath counts what it could not
// write.
func (r ringReader) run(ctx context.Context) error {
	rd, err := ringbuf.NewReader(r.events)
	if err != nil {
		return fmt.Errorf("%s events reader: %w", r.typ, err)
	}
	done := make(chan struct{})
	// pollLost reads the datapath's maps: run returns only after it ended,
	// so the caller may close the maps once run has returned.
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
		}
		rd.Close() // unblocks Read
	}()
	if r.lost != nil {
		// The baseline is read before the first record, so a client that
		// saw an event knows every later loss is reported.
		base, err := r.lost()
		if err != nil {
			r.log.Warn("read events lost", "type", r.typ, "err", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.pollLost(ctx, done, base)
		}()
	}
	clk := newClock()
	var rec ringbuf.Record
	rd.SetDeadline(time.Now().Add(PollEvery))
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// Every record written so far has been read: wait again.
				rd.SetDeadline(time.Now().Add(PollEvery))
				continue
			}
			return fmt.Errorf("read %s events: %w", r.typ, err)
		}
		ev, err := r.handle(rec.RawSample, clk)
		if err != nil {
			r.log.Warn("trace event", "type", r.typ, "err", err)
			continue
		}
		r.hub.Publish(ev)
	}
}

// pollLost publishes growth of the kernel's lost count. The count is
// pinned and outlives agents: the first read is the baseline.
func (r ringReader) pollLost(ctx context.Context, done <-chan struct{}, last uint64) {
	every := r.lostEvery
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-done:
			return
		case <-t.C:
		}
		n, err := r.lost()
		if err != nil {
			r.log.Warn("read events lost", "type", r.typ, "err", err)
			continue
		}
		if n > last {
			r.hub.Lost(apiv1.TraceLostKernel, r.typ, n-last)
		}
		last = n
	}
}

// clock converts CLOCK_MONOTONIC (bpf_ktime_get_ns) to wall time.
type clock struct{ boot time.Time }

func newClock() clock {
	var ts unix.Timespec
	now := time.Now()
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return clock{boot: now}
	}
	return clock{boot: now.Add(-time.Duration(ts.Nano()))}
}

func (c clock) wall(mono time.Duration) time.Time { return c.boot.Add(mono).UTC() }
