//go:build linux

package trace

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
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
	// lostFile, when set, keeps the last lost count read (with the ring
	// buffer map's kernel ID) across agents: the next agent's reader
	// reports what the kernel lost while no agent read, rather than taking
	// it as its baseline. It lives in the state dir, as long as the pins.
	lostFile string
	// ready, when set, is closed once the namers can name pods. Records
	// wait in the kernel's ring buffer until then: a restarted agent would
	// otherwise publish what the datapath decided while no agent ran (the
	// ring is pinned) before its pod cache is synced, with IPs where the
	// pods' names belong. A ring that fills meanwhile counts its losses.
	ready <-chan struct{}
}

// lostState is lostFile's content.
type lostState struct {
	// MapID is the kernel ID of the events map: a recreated datapath has
	// a new one (and a fresh counter), so an old count does not apply.
	MapID uint32 `json:"mapID"`
	Lost  uint64 `json:"lost"`
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
		if prev, ok := r.loadLost(); ok && err == nil && prev < base {
			// Lost between the previous agent's last read and now.
			r.log.Warn("events lost while no agent read them", "type", r.typ, "lost", base-prev)
			r.hub.Lost(apiv1.TraceLostKernel, r.typ, base-prev)
		}
		if err == nil {
			r.saveLost(base)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.pollLost(ctx, done, base)
		}()
	}
	if r.ready != nil {
		select {
		case <-r.ready:
		case <-ctx.Done():
			return nil
		}
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
			r.saveLost(n)
		}
		last = n
	}
}

func (r ringReader) mapID() (uint32, bool) {
	if r.events == nil {
		return 0, false
	}
	info, err := r.events.Info()
	if err != nil {
		return 0, false
	}
	id, ok := info.ID()
	return uint32(id), ok
}

// loadLost is the count a previous agent last read from this same map.
func (r ringReader) loadLost() (uint64, bool) {
	if r.lostFile == "" {
		return 0, false
	}
	b, err := os.ReadFile(r.lostFile)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			r.log.Warn("read events lost state", "type", r.typ, "file", r.lostFile, "err", err)
		}
		return 0, false
	}
	var st lostState
	id, ok := r.mapID()
	if err := json.Unmarshal(b, &st); err != nil || !ok || st.MapID != id {
		return 0, false
	}
	return st.Lost, true
}

// saveLost records n as read (write + rename: a reader never sees half).
func (r ringReader) saveLost(n uint64) {
	if r.lostFile == "" {
		return
	}
	id, ok := r.mapID()
	if !ok {
		return
	}
	b, _ := json.Marshal(lostState{MapID: id, Lost: n})
	dir := filepath.Dir(r.lostFile)
	err := os.MkdirAll(dir, 0o700)
	var tmp *os.File
	if err == nil {
		tmp, err = os.CreateTemp(dir, "."+filepath.Base(r.lostFile)+"-*")
	}
	if err == nil {
		_, err = tmp.Write(b)
		err = errors.Join(err, tmp.Close())
		if err == nil {
			err = os.Rename(tmp.Name(), r.lostFile)
		}
		if err != nil {
			os.Remove(tmp.Name())
		}
	}
	if err != nil {
		r.log.Warn("save events lost state", "type", r.typ, "file", r.lostFile, "err", err)
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
