//go:build linux

package trace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// RingReader is what every reader of a datapath ring buffer shares: the
// read loop, the polling of the datapath's pinned lost counter, and the
// conversion of the records' CLOCK_MONOTONIC stamps to wall time. A
// feature's reader supplies Decode.
type RingReader struct {
	// Name says which ring this is in errors and logs ("l7 events").
	Name string
	// Type is the trace type the ring carries, for lost-events notices.
	Type string
	// Events is the ring buffer map.
	Events *ebpf.Map
	// Lost reads the datapath's running count of records it could not
	// write (the ring was full); nil when it has none.
	Lost func() (uint64, error)
	// LostEvery is how often Lost is read (default a second).
	LostEvery time.Duration
	// Poll, when set, is how often the ring is looked at without a
	// wakeup: for a datapath that submits with BPF_RB_NO_WAKEUP below a
	// fill level (to spare the hot path a wakeup per record).
	Poll time.Duration
	Hub  *Hub
	Log  *slog.Logger
	// Decode turns one record into an event; wall converts a
	// CLOCK_MONOTONIC duration (bpf_ktime_get_ns) to wall time. A record
	// it cannot decode is logged and skipped.
	Decode func(raw []byte, wall func(time.Duration) time.Time) (apiv1.TraceEvent, error)
}

// Run reads until ctx ends. Nothing here blocks the datapath: a slow
// reader fills the ring buffer, and the datapath counts what it could not
// write.
func (r *RingReader) Run(ctx context.Context) error {
	rd, err := ringbuf.NewReader(r.Events)
	if err != nil {
		return fmt.Errorf("%s reader: %w", r.Name, err)
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
		}
		rd.Close() // unblocks Read
	}()
	if r.Lost != nil {
		// The baseline is read before the first record, so a client that
		// saw an event knows every later loss is reported.
		base, err := r.Lost()
		if err != nil {
			r.Log.Warn("read lost count", "ring", r.Name, "err", err)
		}
		go r.pollLost(ctx, done, base)
	}
	clk := newClock()
	var rec ringbuf.Record
	for {
		if r.Poll > 0 {
			rd.SetDeadline(time.Now().Add(r.Poll))
		}
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // nothing new within Poll
			}
			if errors.Is(err, os.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("read %s: %w", r.Name, err)
		}
		ev, err := r.Decode(rec.RawSample, clk.wall)
		if err != nil {
			r.Log.Warn("undecodable record", "ring", r.Name, "err", err)
			continue
		}
		r.Hub.Publish(ev)
	}
}

// pollLost publishes growth of the datapath's lost count. The count is
// pinned and outlives agents: the first read is the baseline.
func (r *RingReader) pollLost(ctx context.Context, done <-chan struct{}, last uint64) {
	every := r.LostEvery
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
		n, err := r.Lost()
		if err != nil {
			r.Log.Warn("read lost count", "ring", r.Name, "err", err)
			continue
		}
		if n > last {
			r.Hub.Lost(apiv1.TraceLostKernel, r.Type, n-last)
		}
		last = n
	}
}
