//go:build linux

package agent

import (
	"context"
	"log/slog"
	"sync"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"
)

// datapathObjects are a feature's loaded BPF objects.
type datapathObjects interface {
	// Detach removes the feature's links, maps and pins.
	Detach() error
	// Close releases this process's handles and keeps the pins.
	Close() error
}

// syncRunner programs a feature's maps from the API until its context ends.
type syncRunner interface {
	Run(ctx context.Context) error
	Errors() []string
}

// syncedFeature is the lifecycle service-lb and policy share: loaded objects
// plus one sync goroutine programming them. The features embed it and only
// say how to load and what to sync.
type syncedFeature struct {
	name string
	log  *slog.Logger
	// detachPinned removes state pinned by an earlier agent when this
	// process loaded nothing.
	detachPinned func() error

	mu     sync.Mutex
	objs   datapathObjects
	syncer syncRunner
	cancel context.CancelFunc
	done   chan struct{}
	runErr error
}

// running reports whether Enable already succeeded; f.mu must be held.
func (f *syncedFeature) running() bool { return f.objs != nil }

// start runs s over objs until Disable or Close; f.mu must be held.
func (f *syncedFeature) start(ctx context.Context, objs datapathObjects, s syncRunner) {
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	f.objs, f.syncer, f.cancel, f.done, f.runErr = objs, s, cancel, done, nil
	go func() {
		defer close(done)
		if err := s.Run(sctx); err != nil && sctx.Err() == nil {
			f.log.Error("sync stopped", "feature", f.name, "err", err)
			f.mu.Lock()
			f.runErr = err
			f.mu.Unlock()
		}
	}()
}

// stop ends the sync; f.mu must not be held (Run's error path takes it).
func (f *syncedFeature) stop() {
	f.mu.Lock()
	cancel, done := f.cancel, f.done
	f.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// release stops the sync and hands the objects to fn (Detach or Close).
func (f *syncedFeature) release(fn func(datapathObjects) error, none func() error) error {
	f.stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncer, f.cancel, f.done = nil, nil, nil
	if f.objs == nil {
		return none()
	}
	err := fn(f.objs)
	f.objs = nil
	return err
}

// Disable detaches and unpins everything of the feature. Connections keep
// working: service-lb translated them at connect() already, and without
// policy programs packets simply stop being checked.
func (f *syncedFeature) Disable() error {
	return f.release(datapathObjects.Detach, f.detachPinned)
}

// Close leaves the feature attached through its pins.
func (f *syncedFeature) Close() error {
	return f.release(datapathObjects.Close, func() error { return nil })
}

// Errors implements ErrorReporter.
func (f *syncedFeature) Errors() []string {
	f.mu.Lock()
	s, runErr := f.syncer, f.runErr
	f.mu.Unlock()
	var out []string
	if runErr != nil {
		out = append(out, f.name+" sync stopped: "+runErr.Error())
	}
	if s != nil {
		out = append(out, s.Errors()...)
	}
	return out
}

// syncBase is what every feature's sync gets from the agent.
func (a *Agent) syncBase(feature string, iv apisync.Intervals) apisync.Base {
	return apisync.Base{Client: a.cfg.Kube, NodeName: a.cfg.NodeName, Log: a.log.With("feature", feature), Intervals: iv}
}
