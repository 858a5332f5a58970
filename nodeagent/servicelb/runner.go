package servicelb

import (
	"context"
	"time"
)

// runner is a bounded-frequency runner in the spirit of kube-proxy's
// async.BoundedFrequencyRunner: fn runs at most once per minInterval however
// many requests arrive (they coalesce into the next run), at least once per
// maxInterval, and retryInterval after a failed run.
//
// The reason kind tells fn why it runs: periodic runs are full resyncs that
// repair drift in the datapath; requested runs apply only the delta.
type runner struct {
	fn            func(periodic bool) error
	minInterval   time.Duration
	maxInterval   time.Duration
	retryInterval time.Duration
	requests      chan struct{}
}

func newRunner(fn func(periodic bool) error, minInterval, maxInterval, retryInterval time.Duration) *runner {
	return &runner{fn: fn, minInterval: minInterval, maxInterval: maxInterval, retryInterval: retryInterval,
		requests: make(chan struct{}, 1)}
}

// Request asks for a run soon; it never blocks.
func (r *runner) Request() {
	select {
	case r.requests <- struct{}{}:
	default: // a run is already pending; it will see this change too
	}
}

// Loop runs fn once at once (as a periodic, i.e. full, run) and then on
// requests and timers until ctx is done.
func (r *runner) Loop(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	var last time.Time
	periodic := true // the first run is always a full sync
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.requests:
		case <-timer.C:
			periodic = true
		}
		if wait := time.Until(last.Add(r.minInterval)); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		// Requests that arrived while waiting are served by this run.
		select {
		case <-r.requests:
		default:
		}
		last = time.Now()
		err := r.fn(periodic)
		periodic = false
		next := r.maxInterval
		if err != nil {
			next = r.retryInterval
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}
