package servicelb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"

	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// fakeDatapath is an in-memory Datapath with the real one's capacity rule
// (nothing written when an Apply does not fit) and injectable faults.
type fakeDatapath struct {
	mu         sync.Mutex
	svcs       map[uint32]socklb.Service
	maxF, maxB int
	// failApply makes the next n Applies fail with a transient error.
	failApply int
	applies   []uint32
	deletes   []uint32
}

func newFakeDatapath(maxF, maxB int) *fakeDatapath {
	return &fakeDatapath{svcs: map[uint32]socklb.Service{}, maxF: maxF, maxB: maxB}
}

var errTransient = errors.New("injected: map update ENOMEM")

func (d *fakeDatapath) used() (f, b int) {
	for _, s := range d.svcs {
		f += len(s.Frontends)
		b += len(s.Backends)
	}
	return f, b
}

func (d *fakeDatapath) Apply(svc socklb.Service) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if svc.ID == 0 || len(svc.Frontends) == 0 {
		return fmt.Errorf("apply: invalid service %+v", svc)
	}
	if d.failApply > 0 {
		d.failApply--
		return fmt.Errorf("apply service %d: %w", svc.ID, errTransient)
	}
	f, b := d.used()
	old := d.svcs[svc.ID]
	if f-len(old.Frontends)+len(svc.Frontends) > d.maxF || b-len(old.Backends)+len(svc.Backends) > d.maxB {
		return fmt.Errorf("apply service %d: %w", svc.ID, socklb.ErrFull)
	}
	// A frontend belongs to one service: it moves, like in the real maps.
	for id, other := range d.svcs {
		if id == svc.ID {
			continue
		}
		other.Frontends = slices.DeleteFunc(slices.Clone(other.Frontends), func(f socklb.Frontend) bool {
			return slices.Contains(svc.Frontends, f)
		})
		d.svcs[id] = other
	}
	d.svcs[svc.ID] = normalize(svc)
	d.applies = append(d.applies, svc.ID)
	return nil
}

func (d *fakeDatapath) Delete(id uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.svcs, id)
	d.deletes = append(d.deletes, id)
	return nil
}

func (d *fakeDatapath) Capacity() (int, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f, b := d.used()
	return d.maxF - f, d.maxB - b
}

func (d *fakeDatapath) Services() (map[uint32]socklb.Service, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.svcs), nil
}

// byFrontend returns the programmed service owning f.
func byFrontend(t *testing.T, dp Datapath, f socklb.Frontend) (socklb.Service, bool) {
	t.Helper()
	svcs, err := dp.Services()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		if slices.Contains(s.Frontends, f) {
			return s, true
		}
	}
	return socklb.Service{}, false
}

type harness struct {
	client   kubernetes.Interface
	syncer   *Syncer
	recorder *record.FakeRecorder
	metrics  *Metrics
	syncs    chan SyncResult
}

// startSyncer runs a Syncer against a fake clientset holding objs and the
// node "node-a"; it stops with the test.
func startSyncer(t *testing.T, dp Datapath, tweak func(*Options), objs ...runtime.Object) *harness {
	t.Helper()
	return startSyncerOpts(t, context.Background(), dp, tweak, objs...)
}

// startSyncerCtx is startSyncer that also stops when ctx ends.
func startSyncerCtx(t *testing.T, ctx context.Context, dp Datapath, objs ...runtime.Object) *harness {
	t.Helper()
	return startSyncerOpts(t, ctx, dp, nil, objs...)
}

func startSyncerOpts(t *testing.T, parent context.Context, dp Datapath, tweak func(*Options), objs ...runtime.Object) *harness {
	t.Helper()
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}, Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
		{Type: v1.NodeInternalIP, Address: "172.18.0.2"}}}}
	h := &harness{
		client:   fake.NewClientset(append([]runtime.Object{n}, objs...)...),
		recorder: record.NewFakeRecorder(100),
		metrics:  NewMetrics(nil),
		syncs:    make(chan SyncResult, 1000),
	}
	opts := Options{
		Base: apisync.Base{Client: h.client, NodeName: "node-a", Recorder: h.recorder,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Intervals: apisync.Intervals{Retry: 20 * time.Millisecond}},
		Datapath: dp, Metrics: h.metrics,
		OnSync: func(r SyncResult) {
			select {
			case h.syncs <- r:
			default:
			}
		},
	}
	if tweak != nil {
		tweak(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	h.syncer = s
	ctx, cancel := context.WithCancel(parent)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return h
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func must[T any](t *testing.T) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func TestSyncAddUpdateDelete(t *testing.T) {
	ctx := context.Background()
	dp := newFakeDatapath(100, 100)
	httpPorts := slicePorts("http", v1.ProtocolTCP, 8080)
	other := service("ns", "other", clusterIPs("10.96.0.99"))
	h := startSyncer(t, dp, nil, other, epSlice("ns", "other", "other-1", v4, httpPorts, ep("10.244.9.9")))
	cip := fe("10.96.0.10", 80, tcp)
	eventually(t, "initial full sync", h.syncer.Synced)

	svcs := h.client.CoreV1().Services("ns")
	epss := h.client.DiscoveryV1().EndpointSlices("ns")
	must[*v1.Service](t)(svcs.Create(ctx, service("ns", "web"), metav1.CreateOptions{}))
	eventually(t, "service with no endpoints", func() bool {
		s, ok := byFrontend(t, dp, cip)
		return ok && len(s.Backends) == 0
	})
	id := func() uint32 { s, _ := byFrontend(t, dp, cip); return s.ID }()

	sl := must[*discovery.EndpointSlice](t)(epss.Create(ctx, epSlice("ns", "web", "web-1", v4, httpPorts, ep("10.244.0.4")), metav1.CreateOptions{}))
	eventually(t, "first endpoint", func() bool {
		s, _ := byFrontend(t, dp, cip)
		return slices.Equal(s.Backends, bes(be("10.244.0.4", 8080)))
	})

	// An endpoint change reprograms exactly that Service, nothing else.
	dp.mu.Lock()
	dp.applies = nil
	dp.mu.Unlock()
	sl.Endpoints = append(sl.Endpoints, ep("10.244.0.5"))
	must[*discovery.EndpointSlice](t)(epss.Update(ctx, sl, metav1.UpdateOptions{}))
	eventually(t, "second endpoint", func() bool {
		s, _ := byFrontend(t, dp, cip)
		return slices.Equal(s.Backends, bes(be("10.244.0.4", 8080), be("10.244.0.5", 8080)))
	})
	dp.mu.Lock()
	if !slices.Equal(dp.applies, []uint32{id}) {
		t.Errorf("applies after one endpoint change = %v, want [%d]", dp.applies, id)
	}
	dp.mu.Unlock()

	// A second port gets its own ID; the first keeps its.
	web := must[*v1.Service](t)(svcs.Get(ctx, "web", metav1.GetOptions{}))
	web.Spec.Ports = append(web.Spec.Ports, port("metrics", v1.ProtocolTCP, 9100, intstr9100, 0))
	must[*v1.Service](t)(svcs.Update(ctx, web, metav1.UpdateOptions{}))
	mfe := fe("10.96.0.10", 9100, tcp)
	eventually(t, "second port", func() bool { _, ok := byFrontend(t, dp, mfe); return ok })
	if s, _ := byFrontend(t, dp, cip); s.ID != id {
		t.Errorf("first port's ID changed %d -> %d", id, s.ID)
	}
	if s, _ := byFrontend(t, dp, mfe); s.ID == id || len(s.Backends) != 0 {
		t.Errorf("second port = %+v, want own ID and no backends (the slice has no port 'metrics')", s)
	}
	// The trace names IDs: each ID is its Service port.
	mid := func() uint32 { s, _ := byFrontend(t, dp, mfe); return s.ID }()
	for i, want := range map[uint32]string{id: "ns/web:http/tcp/v4", mid: "ns/web:metrics/tcp/v4"} {
		if k, ok := h.syncer.PortByID(i); !ok || k.String() != want {
			t.Errorf("PortByID(%d) = %v, %v; want %s", i, k, ok, want)
		}
	}
	if k, ok := h.syncer.PortByID(9999); ok {
		t.Errorf("PortByID(unknown) = %v", k)
	}

	if err := epss.Delete(ctx, "web-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "endpoints gone", func() bool { s, _ := byFrontend(t, dp, cip); return len(s.Backends) == 0 })

	if err := svcs.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "service gone", func() bool {
		svcs, _ := dp.Services()
		return len(svcs) == 1
	})
	if _, ok := byFrontend(t, dp, fe("10.96.0.99", 80, tcp)); !ok {
		t.Error("unrelated service lost")
	}
	if got := testutil.ToFloat64(h.metrics.Programmed); got != 1 {
		t.Errorf("programmed gauge = %v, want 1", got)
	}
	if n := testutil.CollectAndCount(h.metrics.SyncDuration); n == 0 {
		t.Error("no sync duration observed")
	}

	// Recreated with the same ClusterIP, it must not get an ID the agent
	// already handed out to a port that was deleted... unless it is that
	// very port again (same namespace/name, port name, protocol).
	must[*v1.Service](t)(svcs.Create(ctx, service("ns", "web2"), metav1.CreateOptions{}))
	eventually(t, "web2", func() bool { _, ok := byFrontend(t, dp, cip); return ok })
	if s, _ := byFrontend(t, dp, cip); s.ID == id {
		t.Errorf("web2 reused web's ID %d", id)
	}
}

var intstr9100 = intstrFrom(9100)

func TestSyncHeadlessAndExternalNameUntouched(t *testing.T) {
	dp := newFakeDatapath(100, 100)
	h := startSyncer(t, dp, nil,
		service("ns", "db", clusterIPs("None")),
		service("ns", "ext", svcType(v1.ServiceTypeExternalName), clusterIPs("")),
	)
	eventually(t, "initial full sync", h.syncer.Synced)
	if svcs, _ := dp.Services(); len(svcs) != 0 {
		t.Errorf("programmed %v, want nothing", svcs)
	}
}

func TestSyncNodePortFollowsNodeIPs(t *testing.T) {
	ctx := context.Background()
	dp := newFakeDatapath(100, 100)
	h := startSyncer(t, dp, nil, service("ns", "web", svcType(v1.ServiceTypeNodePort),
		ports(port("http", v1.ProtocolTCP, 80, intstrFrom(8080), 30080))))
	eventually(t, "nodeport on 172.18.0.2", func() bool { _, ok := byFrontend(t, dp, fe("172.18.0.2", 30080, tcp)); return ok })
	n := must[*v1.Node](t)(h.client.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}))
	n.Status.Addresses = []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "172.18.0.3"}}
	must[*v1.Node](t)(h.client.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}))
	eventually(t, "nodeport moved to 172.18.0.3", func() bool {
		_, old := byFrontend(t, dp, fe("172.18.0.2", 30080, tcp))
		_, cur := byFrontend(t, dp, fe("172.18.0.3", 30080, tcp))
		return !old && cur
	})
}

func TestSyncMapFull(t *testing.T) {
	ctx := context.Background()
	// Room for 3 frontends and 3 backends.
	dp := newFakeDatapath(3, 3)
	httpPorts := slicePorts("http", v1.ProtocolTCP, 8080)
	h := startSyncer(t, dp, nil,
		service("ns", "a", clusterIPs("10.96.0.1")),
		epSlice("ns", "a", "a-1", v4, httpPorts, ep("10.244.0.1"), ep("10.244.0.2")))
	eventually(t, "a programmed", func() bool { _, ok := byFrontend(t, dp, fe("10.96.0.1", 80, tcp)); return ok })

	// b (two ports) first without endpoints, which fits; then its slice
	// needs 2 more backends where 1 is free: neither port is updated.
	svcs := h.client.CoreV1().Services("ns")
	epss := h.client.DiscoveryV1().EndpointSlices("ns")
	twoPorts := ports(port("http", v1.ProtocolTCP, 80, intstrFrom(8080), 0), port("alt", v1.ProtocolTCP, 81, intstrFrom(8081), 0))
	must[*v1.Service](t)(svcs.Create(ctx, service("ns", "b", clusterIPs("10.96.0.2"), twoPorts), metav1.CreateOptions{}))
	eventually(t, "b without endpoints", func() bool {
		_, p1 := byFrontend(t, dp, fe("10.96.0.2", 80, tcp))
		_, p2 := byFrontend(t, dp, fe("10.96.0.2", 81, tcp))
		return p1 && p2
	})
	must[*discovery.EndpointSlice](t)(epss.Create(ctx, epSlice("ns", "b", "b-1", v4,
		slicePorts("http", v1.ProtocolTCP, 8080, "alt", v1.ProtocolTCP, 8081), ep("10.244.1.1")), metav1.CreateOptions{}))

	select {
	case ev := <-h.recorder.Events:
		if !strings.Contains(ev, "Warning "+ReasonMapFull) || !strings.Contains(ev, "ns/b") {
			t.Errorf("event = %q", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no ServiceLBMapFull event")
	}
	errs := h.syncer.Errors()
	if len(errs) != 1 || !strings.Contains(errs[0], "ns/b") || !strings.Contains(errs[0], "map full") {
		t.Errorf("Errors = %q, want one about ns/b being full", errs)
	}
	for _, p := range []uint16{80, 81} {
		if s, _ := byFrontend(t, dp, fe("10.96.0.2", p, tcp)); len(s.Backends) != 0 {
			t.Errorf("b port %d updated to %v although b does not fit as a whole", p, s.Backends)
		}
	}
	if s, ok := byFrontend(t, dp, fe("10.96.0.1", 80, tcp)); !ok || len(s.Backends) != 2 {
		t.Errorf("a = %+v, want it untouched", s)
	}
	if got := testutil.ToFloat64(h.metrics.SyncErrors.WithLabelValues("full")); got != 1 {
		t.Errorf("full errors = %v, want 1 (one per episode)", got)
	}

	// Deleting a makes room; b is retried without any change of its own.
	if err := svcs.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b programmed after a's delete", func() bool {
		s1, _ := byFrontend(t, dp, fe("10.96.0.2", 80, tcp))
		s2, _ := byFrontend(t, dp, fe("10.96.0.2", 81, tcp))
		return len(s1.Backends) == 1 && len(s2.Backends) == 1
	})
	eventually(t, "error cleared", func() bool { return len(h.syncer.Errors()) == 0 })
}

func TestSyncTransientErrorThenFullResync(t *testing.T) {
	dp := newFakeDatapath(100, 100)
	dp.failApply = 1
	h := startSyncer(t, dp, nil, service("ns", "web"))
	var sawErr, sawRecovery bool
	deadline := time.After(5 * time.Second)
	for !sawRecovery {
		select {
		case r := <-h.syncs:
			if r.Err != nil {
				sawErr = true
				if !errors.Is(r.Err, errTransient) {
					t.Errorf("sync error = %v", r.Err)
				}
				if errs := h.syncer.Errors(); len(errs) != 1 || !strings.Contains(errs[0], "ENOMEM") {
					t.Errorf("Errors after failure = %q", errs)
				}
			} else if sawErr {
				if !r.Full {
					t.Errorf("recovery sync was partial, want full")
				}
				sawRecovery = true
			}
		case <-deadline:
			t.Fatalf("no recovery (saw error: %v)", sawErr)
		}
	}
	if _, ok := byFrontend(t, dp, fe("10.96.0.10", 80, tcp)); !ok {
		t.Error("service not programmed after recovery")
	}
	if len(h.syncer.Errors()) != 0 || !h.syncer.Synced() {
		t.Errorf("after recovery Errors = %q synced = %v", h.syncer.Errors(), h.syncer.Synced())
	}
	if got := testutil.ToFloat64(h.metrics.SyncErrors.WithLabelValues("datapath")); got != 1 {
		t.Errorf("datapath errors = %v, want 1", got)
	}
}

func TestSyncAdoptsIDsAfterRestart(t *testing.T) {
	dp := newFakeDatapath(100, 100)
	// What a previous agent left: web's port as ID 7 (stale backend), and
	// ID 9 for a Service deleted while no agent ran.
	dp.svcs[7] = lbsvc(fes(fe("10.96.0.10", 80, tcp)), bes(be("10.244.0.1", 8080)), 0)
	dp.svcs[7] = func(s socklb.Service) socklb.Service { s.ID = 7; return s }(dp.svcs[7])
	dp.svcs[9] = func(s socklb.Service) socklb.Service { s.ID = 9; return s }(lbsvc(fes(fe("10.96.0.50", 80, tcp)), nil, 0))
	h := startSyncer(t, dp, nil,
		service("ns", "web"),
		epSlice("ns", "web", "web-1", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.0.2")),
		service("ns", "new", clusterIPs("10.96.0.20")))
	eventually(t, "initial full sync", h.syncer.Synced)
	svcs, _ := dp.Services()
	if s := svcs[7]; !slices.Equal(s.Frontends, fes(fe("10.96.0.10", 80, tcp))) || !slices.Equal(s.Backends, bes(be("10.244.0.2", 8080))) {
		t.Errorf("ID 7 = %+v, want web with the current endpoint", s)
	}
	if _, ok := svcs[9]; ok {
		t.Error("stale ID 9 not deleted")
	}
	if k, ok := h.syncer.PortByID(7); !ok || k.Service.Name != "web" || k.PortName != "http" {
		t.Errorf("PortByID(7) = %v, %v; want the adopted ns/web:http", k, ok)
	}
	if s, ok := byFrontend(t, dp, fe("10.96.0.20", 80, tcp)); !ok || s.ID <= 9 {
		t.Errorf("new service = %+v, want an ID above every ID found in the maps", s)
	}
}

func TestSyncPeriodicFullSyncRepairsDrift(t *testing.T) {
	dp := newFakeDatapath(100, 100)
	h := startSyncer(t, dp, func(o *Options) { o.Intervals.Max = 50 * time.Millisecond }, service("ns", "web"))
	eventually(t, "programmed", func() bool { _, ok := byFrontend(t, dp, fe("10.96.0.10", 80, tcp)); return ok })
	dp.mu.Lock()
	dp.svcs = map[uint32]socklb.Service{} // someone wiped the maps
	dp.applies = nil
	dp.mu.Unlock()
	eventually(t, "repaired", func() bool { _, ok := byFrontend(t, dp, fe("10.96.0.10", 80, tcp)); return ok })
	// Unchanged periodic syncs write nothing.
	time.Sleep(150 * time.Millisecond)
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if len(dp.applies) != 1 {
		t.Errorf("applies = %v, want exactly one (the repair)", dp.applies)
	}
	_ = h
}
