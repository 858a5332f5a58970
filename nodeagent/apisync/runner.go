package apisync

// Runner is the bounded-frequency runner every datapath sync of the agent
// uses, after kube-proxy's async.BoundedFrequencyRunner: event handlers only
// Request a run, and the runner coalesces requests so fn runs at most once
// per minInterval, at least once per maxInterval, and retryInterval after a
// failed run.

import (
	"context"
	"time"
)

type Runner struct {
	fn            func(full bool) error
	minInterval   time.Duration
	maxInterval   time.Duration
	retryInterval time.Duration
	requests      chan struct{}
}

// NewRunner returns a runner of fn. fn's argument says whether the run must be a
// full resync: the first run, every maxInterval run (repairs drift in the
// datapath) and the run after a failure; requested runs apply only the delta.
func NewRunner(fn func(full bool) error, iv Intervals) *Runner {
	return &Runner{fn: fn, minInterval: iv.Min, maxInterval: iv.Max, retryInterval: iv.Retry,
		requests: make(chan struct{}, 1)}
}

// Request asks for a run soon; it never blocks.
func (r *Runner) Request() {
	select {
	case r.requests <- struct{}{}:
	default: // a run is already pending and will see this change too
	}
}

// Loop runs fn at once as a full run, then on requests and timers until ctx
// is done.
func (r *Runner) Loop(ctx context.Context) {
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
