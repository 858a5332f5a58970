package netpol

import (
	"context"
	"time"
)

// runner is a bounded-frequency runner like kube-proxy's
// async.BoundedFrequencyRunner: fn runs at most once per minInterval however
// many requests arrive (they coalesce into the next run), at least once per
// maxInterval as a full resync, and after retryInterval, as a full resync,
// when a run failed.
type runner struct {
	fn            func(full bool) error
	minInterval   time.Duration
	maxInterval   time.Duration
	retryInterval time.Duration
	requests      chan struct{}
}

func newRunner(fn func(full bool) error, minInterval, maxInterval, retryInterval time.Duration) *runner {
	return &runner{fn: fn, minInterval: minInterval, maxInterval: maxInterval, retryInterval: retryInterval,
		requests: make(chan struct{}, 1)}
}

// Request asks for a run soon; it never blocks.
func (r *runner) Request() {
	select {
	case r.requests <- struct{}{}:
	default: // a run is already pending and will see this change too
	}
}

// Loop runs fn at once as a full run, then on requests and timers until ctx
// is done.
func (r *runner) Loop(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	var last time.Time
	full := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.requests:
		case <-timer.C:
			full = true
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
		err := r.fn(full)
		full = false
		next := r.maxInterval
		if err != nil {
			next, full = r.retryInterval, true
		}
		timer.Stop()
		select {
		case <-timer.C:
		default:
		}
		timer.Reset(next)
	}
}
