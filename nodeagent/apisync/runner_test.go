package apisync

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// recorder records the runs of a Runner.
type recorder struct {
	mu   sync.Mutex
	runs []bool // full flag of each run
	fail int    // fail this many runs from now
	ran  chan struct{}
}

func (r *recorder) fn(full bool) error {
	r.mu.Lock()
	r.runs = append(r.runs, full)
	fail := r.fail > 0
	if fail {
		r.fail--
	}
	r.mu.Unlock()
	r.ran <- struct{}{}
	if fail {
		return errors.New("injected")
	}
	return nil
}

func (r *recorder) get() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]bool(nil), r.runs...)
}

func wait(t *testing.T, ch chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("no run within 5s")
	}
}

func TestRunner(t *testing.T) {
	rec := &recorder{ran: make(chan struct{}, 100)}
	r := NewRunner(rec.fn, Intervals{Min: 50 * time.Millisecond, Max: time.Hour, Retry: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Loop(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	wait(t, rec.ran) // the first run is full
	// A burst of requests coalesces into one delta run after minInterval.
	for range 10 {
		r.Request()
	}
	wait(t, rec.ran)
	time.Sleep(120 * time.Millisecond)
	if got := rec.get(); len(got) != 2 || !got[0] || got[1] {
		t.Fatalf("runs = %v, want [full delta]", got)
	}
	// A failed run is retried as a full run without any request.
	rec.mu.Lock()
	rec.fail = 1
	rec.mu.Unlock()
	r.Request()
	wait(t, rec.ran)
	wait(t, rec.ran)
	if got := rec.get(); len(got) != 4 || got[2] || !got[3] {
		t.Fatalf("runs = %v, want a delta run that fails, then a full retry", got)
	}
}
