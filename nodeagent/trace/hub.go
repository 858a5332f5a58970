// Package trace is the agent side of `kubectl ebpf trace`: a bounded ring of
// this node's last events, fan-out to streaming clients with a bounded
// queue each, the client's filters applied before anything is queued, and
// every lost event counted (metrics) and shown in the stream where it was
// lost. See README.md.
package trace

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Defaults of Options.
const (
	DefaultRingSize = 8192
	// DefaultQueueSize is 80 ms of events at 100k/s: `make bench` (trace
	// rows) lost events to a following client's scheduling hiccups at
	// 100k/s with 1024 (10 ms), none with 8192. A full queue holds a few
	// MB, and only while its client lags.
	DefaultQueueSize = 8192
)

// Options configures a Hub.
type Options struct {
	// Node names this node in lost-events notices.
	Node string
	// RingSize is how many events the node keeps for history requests
	// (default DefaultRingSize).
	RingSize int
	// QueueSize is how many lines one client may lag behind before its
	// stream loses events (default DefaultQueueSize).
	QueueSize int
	// Registerer gets the hub's metrics (nil: none).
	Registerer prometheus.Registerer
	// Now is the clock of lost-events notices (tests).
	Now func() time.Time
}

// Hub holds the ring and the subscribers. Publish never blocks on a client.
type Hub struct {
	opts Options

	mu      sync.Mutex
	ring    []apiv1.TraceEvent // circular, len == RingSize once full
	next    int                // ring index of the next write once full
	evicted uint64             // events overwritten since start
	subs    map[*Subscription]struct{}
	// lastEvicted is the time of the newest overwritten event: a history
	// request from a later time wanted none of them.
	lastEvicted time.Time
	// counts since start for Stats (NodeState), by type and by reason.
	nPublished map[string]uint64
	nLost      map[string]uint64

	published *prometheus.CounterVec
	lost      *prometheus.CounterVec
	clients   prometheus.Gauge
}

// NewHub returns an empty hub; its metrics are registered in
// opts.Registerer.
func NewHub(opts Options) (*Hub, error) {
	if opts.RingSize <= 0 {
		opts.RingSize = DefaultRingSize
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = DefaultQueueSize
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	h := &Hub{
		opts:       opts,
		subs:       map[*Subscription]struct{}{},
		nPublished: map[string]uint64{},
		nLost:      map[string]uint64{},
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kebpf_trace_events_total",
			Help: "Trace events the agent received from the datapath, by type.",
		}, []string{"type"}),
		lost: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kebpf_trace_events_lost_total",
			Help: "Trace events lost, by reason: kernel-buffer-full (the datapath could not write it), agent-buffer-overrun (evicted before a history request read them; counted per request), slow-client (a stream's queue was full).",
		}, []string{"reason"}),
		clients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kebpf_trace_clients",
			Help: "Trace streams open now.",
		}),
	}
	for _, r := range []string{apiv1.TraceLostKernel, apiv1.TraceLostAgent, apiv1.TraceLostSlowClient} {
		h.lost.WithLabelValues(r) // export zeros: a loss shows as a change
	}
	if opts.Registerer != nil {
		for _, c := range []prometheus.Collector{h.published, h.lost, h.clients} {
			if err := opts.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return h, nil
}

// Publish adds e to the ring and queues it for every subscriber whose
// filter it matches. A subscriber whose queue is full loses it (counted,
// and announced in its stream).
func (h *Hub) Publish(e apiv1.TraceEvent) {
	h.published.WithLabelValues(e.Type).Inc()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.nPublished[e.Type]++
	if len(h.ring) < h.opts.RingSize {
		h.ring = append(h.ring, e)
	} else {
		if old := h.ring[h.next].Time; old.After(h.lastEvicted) {
			h.lastEvicted = old
		}
		h.ring[h.next] = e
		h.next = (h.next + 1) % len(h.ring)
		h.evicted++
	}
	for s := range h.subs {
		if s.filter.Match(&e) && !s.push(e) {
			h.lost.WithLabelValues(apiv1.TraceLostSlowClient).Inc()
			h.nLost[apiv1.TraceLostSlowClient]++
		}
	}
}

// Lost records n events a source lost before they reached the hub (reason
// TraceLostKernel): counted, and announced in every open stream, since
// any filter could have matched them.
func (h *Hub) Lost(reason, typ string, n uint64) {
	if n == 0 {
		return
	}
	h.lost.WithLabelValues(reason).Add(float64(n))
	h.mu.Lock()
	defer h.mu.Unlock()
	h.nLost[reason] += n
	for s := range h.subs {
		s.addLost(reason, typ, n)
	}
}

// Stats are the hub's counts since the agent started: the same numbers as
// kebpf_trace_events_total and kebpf_trace_events_lost_total.
type Stats struct {
	// Published counts events received from the datapath, by type.
	Published map[string]uint64
	// Lost counts lost events by reason (apiv1.TraceLost*); a reason that
	// never lost any is absent.
	Lost map[string]uint64
}

// Stats returns copies of the counts.
func (h *Hub) Stats() Stats {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := Stats{Published: make(map[string]uint64, len(h.nPublished)), Lost: make(map[string]uint64, len(h.nLost))}
	for k, v := range h.nPublished {
		st.Published[k] = v
	}
	for k, v := range h.nLost {
		if v > 0 {
			st.Lost[k] = v
		}
	}
	return st
}

// history returns the matching events of the ring at or after since (zero:
// any time), oldest first, at most last (0: all), and how many events the
// ring evicted that the request could have wanted. h.mu must be held.
func (h *Hub) historyLocked(f *apiv1.TraceFilter, last int, since time.Time) ([]apiv1.TraceEvent, uint64) {
	var out []apiv1.TraceEvent
	n := len(h.ring)
	for i := range n {
		e := &h.ring[(h.next+i)%n]
		// By event time, not ring order: events of one node arrive in
		// time order per CPU, not quite globally.
		if !since.IsZero() && e.Time.Before(since) {
			continue
		}
		if f.Match(e) {
			out = append(out, *e)
		}
	}
	if last > 0 && len(out) > last {
		return out[len(out)-last:], 0
	}
	// The request wanted more than the ring kept: it wanted the evicted
	// events too (all of them when it gave no count). Whether they matched
	// the filter is unknown, so this is an upper bound, said as such.
	var missed uint64
	if h.evicted > 0 && (since.IsZero() || !h.lastEvicted.Before(since)) {
		missed = h.evicted
		if last > 0 {
			missed = min(missed, uint64(last-len(out)))
		}
	}
	return out, missed
}

// Subscribe opens a stream: the matching history (q.Last events; all when
// not following and q.Last is 0), then, when q.Follow, every new matching
// event. Close it when done.
func (h *Hub) Subscribe(q apiv1.TraceQuery) *Subscription {
	s := &Subscription{hub: h, filter: q.TraceFilter, cap: h.opts.QueueSize, wake: make(chan struct{}, 1), now: h.opts.Now, node: h.opts.Node}
	h.mu.Lock()
	defer h.mu.Unlock()
	if q.Last > 0 || !q.Follow {
		events, missed := h.historyLocked(&q.TraceFilter, q.Last, q.Since)
		if missed > 0 {
			h.lost.WithLabelValues(apiv1.TraceLostAgent).Add(float64(missed))
			h.nLost[apiv1.TraceLostAgent] += missed
			s.queue = append(s.queue, line{TraceLine: apiv1.TraceLine{Lost: &apiv1.TraceLost{Time: s.now(), Node: s.node,
				Reason: apiv1.TraceLostAgent, Count: missed}}})
		}
		// History goes in whole, whatever the queue size: it is bounded by
		// the ring, and dropping part of it would be a loss of our making.
		for i := range events {
			s.queue = append(s.queue, line{TraceLine: apiv1.TraceLine{Event: &events[i]}})
		}
	}
	if q.Follow {
		h.subs[s] = struct{}{}
		h.clients.Inc()
	} else {
		s.closed = true
	}
	return s
}

func (h *Hub) unsubscribe(s *Subscription) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.subs[s]; ok {
		delete(h.subs, s)
		h.clients.Dec()
	}
}

// line is a queued line; live marks a followed event (history and notices
// do not count against the queue size).
type line struct {
	apiv1.TraceLine
	live bool
}

// lostKey is one pending notice of a subscription.
type lostKey struct{ reason, typ string }

// Subscription is one client's stream.
type Subscription struct {
	hub    *Hub
	filter apiv1.TraceFilter
	cap    int
	node   string
	now    func() time.Time
	wake   chan struct{}

	mu     sync.Mutex
	queue  []line
	live   int                // queued events that count against cap
	lost   map[lostKey]uint64 // lost since the last notice, not yet queued
	order  []lostKey          // lost keys in the order first seen
	closed bool               // no more events will come (history only, or Close)
}

// push queues e; false when the queue is full (the loss is remembered and
// announced before the next event that fits, or when the queue drains).
// Notices may take the queue over its size by the few reasons there are,
// so a notice never displaces an event.
func (s *Subscription) push(e apiv1.TraceEvent) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.live >= s.cap {
		s.addLostLocked(apiv1.TraceLostSlowClient, "", 1)
		return false
	}
	s.flushLostLocked()
	s.queue = append(s.queue, line{TraceLine: apiv1.TraceLine{Event: &e}, live: true})
	s.live++
	s.signal()
	return true
}

func (s *Subscription) addLost(reason, typ string, n uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addLostLocked(reason, typ, n)
}

func (s *Subscription) addLostLocked(reason, typ string, n uint64) {
	k := lostKey{reason, typ}
	if s.lost == nil {
		s.lost = map[lostKey]uint64{}
	}
	if _, ok := s.lost[k]; !ok {
		s.order = append(s.order, k)
	}
	s.lost[k] += n
	s.signal()
}

// flushLostLocked queues the pending notices.
func (s *Subscription) flushLostLocked() {
	for _, k := range s.order {
		s.queue = append(s.queue, line{TraceLine: apiv1.TraceLine{Lost: &apiv1.TraceLost{Time: s.now(), Node: s.node,
			Reason: k.reason, Type: k.typ, Count: s.lost[k]}}})
	}
	s.order = s.order[:0]
	clear(s.lost)
}

func (s *Subscription) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Next returns the next line, waiting for one while the stream follows;
// false when the stream is over (history sent, Close, or ctx done).
func (s *Subscription) Next(ctx context.Context) (apiv1.TraceLine, bool) {
	for {
		s.mu.Lock()
		if len(s.queue) == 0 {
			// Nothing queued: losses still pending are announced now
			// rather than waiting for the next event.
			s.flushLostLocked()
		}
		if len(s.queue) > 0 {
			l := s.queue[0]
			s.queue[0] = line{}
			s.queue = s.queue[1:]
			if l.live {
				s.live--
			}
			s.mu.Unlock()
			return l.TraceLine, true
		}
		closed := s.closed
		s.mu.Unlock()
		if closed {
			return apiv1.TraceLine{}, false
		}
		select {
		case <-ctx.Done():
			return apiv1.TraceLine{}, false
		case <-s.wake:
		}
	}
}

// Pending is how many lines are queued (tests, flushing decisions).
func (s *Subscription) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// Close ends the stream: no more events are queued for it.
func (s *Subscription) Close() {
	s.hub.unsubscribe(s)
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.signal()
}
