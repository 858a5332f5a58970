package apisync

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
)

// Intervals bound a Runner: Min between two runs (bursts coalesce), Max
// between two full resyncs (repairs drift between caches and maps), Retry
// after a failed run (then a full resync).
type Intervals struct {
	Min, Max, Retry time.Duration
}

// Or fills the zero (or negative) fields of iv from def.
func (iv Intervals) Or(def Intervals) Intervals {
	if iv.Min <= 0 {
		iv.Min = def.Min
	}
	if iv.Max <= 0 {
		iv.Max = def.Max
	}
	if iv.Retry <= 0 {
		iv.Retry = def.Retry
	}
	return iv
}

// EventComponent is the source component of the agent's Events.
const EventComponent = "kebpf-agent"

// EventRecorder writes Events through client as the agent of nodeName
// until ctx ends or stop is called. Its scheme knows the built-in types,
// so Events can reference Services, Pods and NetworkPolicies.
func EventRecorder(ctx context.Context, client kubernetes.Interface, nodeName string) (rec record.EventRecorder, stop func()) {
	b := record.NewBroadcaster(record.WithContext(ctx))
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: EventComponent, Host: nodeName}), b.Shutdown
}

// StartInformers starts the factories and waits until every informer
// requested from them has synced. The returned stop shuts them down; it is
// non-nil whenever the factories were started. A ctx that ends while
// waiting returns ctx's error.
func StartInformers(ctx context.Context, factories ...informers.SharedInformerFactory) (stop func(), err error) {
	for _, f := range factories {
		f.Start(ctx.Done())
	}
	stop = func() {
		for _, f := range factories {
			f.Shutdown()
		}
	}
	for _, f := range factories {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				if ctx.Err() != nil {
					return stop, ctx.Err()
				}
				return stop, fmt.Errorf("informer %v: cache not synced", typ)
			}
		}
	}
	return stop, nil
}

// Base is what every sync's Options start with (embedded).
type Base struct {
	// Client reads the API; NodeName is this agent's node.
	Client   kubernetes.Interface
	NodeName string
	// Recorder nil: Events are written through Client (StartRecorder).
	Recorder record.EventRecorder
	// Log nil: slog.Default().
	Log *slog.Logger
	// Intervals bound the runner; zero fields take the sync's defaults.
	Intervals Intervals
}

// Complete checks what every sync needs and fills in the defaults; what
// names the sync in the error.
func (b *Base) Complete(what string, def Intervals) error {
	if b.Client == nil || b.NodeName == "" {
		return fmt.Errorf("%s: client and node name are required", what)
	}
	if b.Log == nil {
		b.Log = slog.Default()
	}
	b.Intervals = b.Intervals.Or(def)
	return nil
}

// StartRecorder makes Recorder write Events through Client when no
// recorder was given; stop flushes and ends it.
func (b *Base) StartRecorder(ctx context.Context) (stop func()) {
	if b.Recorder != nil {
		return func() {}
	}
	b.Recorder, stop = EventRecorder(ctx, b.Client, b.NodeName)
	return stop
}
