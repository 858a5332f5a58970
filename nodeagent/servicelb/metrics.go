package servicelb

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the service sync's Prometheus metrics. They outlive any one
// Syncer: the feature can be disabled and enabled again, while a registry
// accepts each metric only once.
type Metrics struct {
	SyncDuration *prometheus.HistogramVec
	Programmed   prometheus.Gauge
	SyncErrors   *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered, for tests).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		SyncDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kebpf_servicelb_sync_duration_seconds",
			Help: "Time one service sync took, by kind (partial: the delta since the last sync; full: rebuilt from the caches and the datapath).",
			// From 100µs (one EndpointSlice change) to ~30s (a full sync of 100k Services).
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}, []string{"kind"}),
		Programmed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kebpf_servicelb_services_programmed",
			Help: "Datapath services (one per Service port and IP family) programmed in the socket LB maps.",
		}),
		SyncErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kebpf_servicelb_sync_errors_total",
			Help: "Service sync failures, by reason (full: a map had no room; datapath: a map write failed and a full resync follows).",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.SyncDuration, m.Programmed, m.SyncErrors)
	}
	return m
}
