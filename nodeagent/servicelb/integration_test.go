//go:build linux

package servicelb

import (
	"context"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/socklb"
)

// realDatapath loads the socklb objects into a private bpffs; the programs
// are loaded but attached to no cgroup, so nothing on the host is affected.
func realDatapath(t *testing.T, opts socklb.LoadOptions) (*socklb.Objects, string) {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	pinDir := filepath.Join(dir, "kubectl-ebpf")
	objs, err := socklb.Load(pinDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := objs.Detach(); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	return objs, pinDir
}

func TestIntegrationSyncRealMaps(t *testing.T) {
	bpftest.RequireRoot(t)
	ctx := context.Background()
	objs, _ := realDatapath(t, socklb.LoadOptions{})
	httpPorts := slicePorts("http", v1.ProtocolTCP, 8080, "dns", v1.ProtocolUDP, 5353)
	twoPorts := ports(port("http", v1.ProtocolTCP, 80, intstrFrom(8080), 0), port("dns", v1.ProtocolUDP, 53, intstrFrom(5353), 0))
	h := startSyncer(t, objs, nil,
		service("ns", "web", clusterIPs("10.96.0.10", "fd00:10:96::a"), twoPorts, svcType(v1.ServiceTypeNodePort),
			func(s *v1.Service) { s.Spec.Ports[0].NodePort = 30080 }),
		epSlice("ns", "web", "web-v4", v4, httpPorts, ep("10.244.0.4")),
		epSlice("ns", "web", "web-v6", v6, httpPorts, ep("fd00:10:244::4")),
		service("ns", "db", clusterIPs("None")),
	)
	eventually(t, "initial full sync", h.syncer.Synced)

	want := map[socklb.Frontend][]socklb.Backend{
		fe("10.96.0.10", 80, tcp):    bes(be("10.244.0.4", 8080)),
		fe("172.18.0.2", 30080, tcp): bes(be("10.244.0.4", 8080)),
		fe("10.96.0.10", 53, udp):    bes(be("10.244.0.4", 5353)),
		fe("fd00:10:96::a", 80, tcp): bes(be("fd00:10:244::4", 8080)),
		fe("fd00:10:96::a", 53, udp): bes(be("fd00:10:244::4", 5353)),
	}
	checkMaps(t, objs, want)
	svcs := services(t, objs)
	if len(svcs) != 4 {
		t.Errorf("%d datapath services, want 4 (2 ports x 2 families)", len(svcs))
	}
	ids := map[socklb.Frontend]uint32{}
	for id, s := range svcs {
		for _, f := range s.Frontends {
			ids[f] = id
		}
	}

	// Update: a second endpoint, measured from the API write to the maps.
	epss := h.client.DiscoveryV1().EndpointSlices("ns")
	var lat, afterWrite []time.Duration
	for len(h.syncs) > 0 {
		<-h.syncs
	}
	for i := range 20 {
		sl := must[*discovery.EndpointSlice](t)(epss.Get(ctx, "web-v4", metav1.GetOptions{}))
		ip := "10.244.0.5"
		if i%2 == 1 {
			ip = "10.244.0.4" // back to one endpoint
		}
		sl.Endpoints = []discovery.Endpoint{ep("10.244.0.4"), ep(ip)}
		wantN := 2
		if i%2 == 1 {
			sl.Endpoints = sl.Endpoints[:1]
			wantN = 1
		}
		start := time.Now()
		must[*discovery.EndpointSlice](t)(epss.Update(ctx, sl, metav1.UpdateOptions{}))
		written := time.Now()
		for {
			if s := frontend(t, objs, fe("10.96.0.10", 80, tcp)); len(s.Backends) == wantN {
				break
			}
			if time.Since(start) > 5*time.Second {
				t.Fatalf("endpoint change %d not in the maps after 5s", i)
			}
			time.Sleep(100 * time.Microsecond)
		}
		lat = append(lat, time.Since(start))
		afterWrite = append(afterWrite, time.Since(written))
	}
	slices.Sort(afterWrite)
	slices.Sort(lat)
	var syncDur []time.Duration
	for len(h.syncs) > 0 {
		if r := <-h.syncs; !r.Full && r.Applied > 0 {
			syncDur = append(syncDur, r.Duration)
		}
	}
	slices.Sort(syncDur)
	// Each of the 20 changes must have been applied by a partial sync, not
	// by falling back to a full one.
	if len(syncDur) == 0 {
		t.Error("no partial sync applied the endpoint changes")
	} else {
		t.Logf("of which the partial sync itself (translate + Apply), %d runs: p50 %s, max %s",
			len(syncDur), syncDur[len(syncDur)/2], syncDur[len(syncDur)-1])
	}
	t.Logf("EndpointSlice update -> socklb maps (fake clientset, real maps), %d runs: p50 %s, p90 %s, max %s (from the Update call's return: p50 %s, max %s)",
		len(lat), lat[len(lat)/2], lat[len(lat)*9/10], lat[len(lat)-1], afterWrite[len(afterWrite)/2], afterWrite[len(afterWrite)-1])

	sl := must[*discovery.EndpointSlice](t)(epss.Get(ctx, "web-v4", metav1.GetOptions{}))
	sl.Endpoints = []discovery.Endpoint{ep("10.244.0.4"), ep("10.244.0.5", terminating(true))}
	must[*discovery.EndpointSlice](t)(epss.Update(ctx, sl, metav1.UpdateOptions{}))
	eventually(t, "terminating endpoint dropped while a ready one exists", func() bool {
		return slices.Equal(frontend(t, objs, fe("10.96.0.10", 80, tcp)).Backends, bes(be("10.244.0.4", 8080)))
	})

	// Update the Service: drop the dns port, add affinity to http.
	svcsAPI := h.client.CoreV1().Services("ns")
	web := must[*v1.Service](t)(svcsAPI.Get(ctx, "web", metav1.GetOptions{}))
	web.Spec.Ports = web.Spec.Ports[:1]
	web.Spec.SessionAffinity = v1.ServiceAffinityClientIP
	must[*v1.Service](t)(svcsAPI.Update(ctx, web, metav1.UpdateOptions{}))
	delete(want, fe("10.96.0.10", 53, udp))
	delete(want, fe("fd00:10:96::a", 53, udp))
	eventually(t, "dns port removed", func() bool { return len(services(t, objs)) == 2 })
	checkMaps(t, objs, want)
	s := frontend(t, objs, fe("10.96.0.10", 80, tcp))
	if s.AffinityTimeout != DefaultAffinityTimeout {
		t.Errorf("affinity = %s, want %s", s.AffinityTimeout, DefaultAffinityTimeout)
	}
	if s.ID != ids[fe("10.96.0.10", 80, tcp)] {
		t.Errorf("http port's ID changed %d -> %d on update", ids[fe("10.96.0.10", 80, tcp)], s.ID)
	}

	// Endpoints gone: the frontend stays with no backends (ECONNREFUSED).
	if err := epss.Delete(ctx, "web-v4", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want[fe("10.96.0.10", 80, tcp)] = bes()
	want[fe("172.18.0.2", 30080, tcp)] = bes()
	eventually(t, "v4 endpoints gone", func() bool { return len(frontend(t, objs, fe("10.96.0.10", 80, tcp)).Backends) == 0 })
	checkMaps(t, objs, want)

	if err := svcsAPI.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "service deleted", func() bool { return len(services(t, objs)) == 0 })
	if f, b := objs.Capacity(); f != socklb.DefaultMaxFrontends || b != socklb.DefaultMaxBackends {
		t.Errorf("capacity after deleting everything = %d/%d, want all free", f, b)
	}
}

// TestIntegrationSyncRestartKeepsIDs stops the sync and starts a new one on
// maps loaded again from the pins, as after an agent restart.
func TestIntegrationSyncRestartKeepsIDs(t *testing.T) {
	bpftest.RequireRoot(t)
	objs, pinDir := realDatapath(t, socklb.LoadOptions{})
	webs := []*v1.Service{service("ns", "a", clusterIPs("10.96.0.1")), service("ns", "b", clusterIPs("10.96.0.2"))}
	sls := []*discovery.EndpointSlice{epSlice("ns", "a", "a-1", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.0.1"))}

	ctx, cancel := context.WithCancel(context.Background())
	h1 := startSyncerCtx(t, ctx, objs, webs[0], webs[1], sls[0])
	eventually(t, "first sync", h1.syncer.Synced)
	eventually(t, "a and b programmed", func() bool { return len(services(t, objs)) == 2 })
	before := services(t, objs)
	cancel()

	reloaded, err := socklb.Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := reloaded.Close(); err != nil {
			t.Errorf("close reloaded maps: %v", err)
		}
	})
	h2 := startSyncer(t, reloaded, nil, webs[0], webs[1], sls[0], service("ns", "c", clusterIPs("10.96.0.3")))
	eventually(t, "c after restart", func() bool { _, ok := byFrontend(t, reloaded, fe("10.96.0.3", 80, tcp)); return ok })
	eventually(t, "sync after restart", h2.syncer.Synced)
	after := services(t, reloaded)
	if len(after) != 3 {
		t.Errorf("%d services after restart, want a, b and c", len(after))
	}
	for id, s := range before {
		if !Equal(after[id], s) {
			t.Errorf("ID %d after restart = %+v, want %+v", id, after[id], s)
		}
	}
	c := frontend(t, reloaded, fe("10.96.0.3", 80, tcp))
	for id := range before {
		if c.ID <= id {
			t.Errorf("new service got ID %d, not above the existing %d", c.ID, id)
		}
	}
}

func TestIntegrationSyncMapFull(t *testing.T) {
	bpftest.RequireRoot(t)
	ctx := context.Background()
	objs, _ := realDatapath(t, socklb.LoadOptions{MaxFrontends: 4, MaxBackends: 4})
	hp := slicePorts("http", v1.ProtocolTCP, 8080)
	h := startSyncer(t, objs, nil,
		service("ns", "a", clusterIPs("10.96.0.1")),
		epSlice("ns", "a", "a-1", v4, hp, ep("10.244.0.1"), ep("10.244.0.2"), ep("10.244.0.3")))
	eventually(t, "a", func() bool { _, ok := byFrontend(t, objs, fe("10.96.0.1", 80, tcp)); return ok })

	// b first without endpoints (fits), then its 2 endpoints where 1
	// backend slot is free: the update is not written at all.
	epss := h.client.DiscoveryV1().EndpointSlices("ns")
	must[*v1.Service](t)(h.client.CoreV1().Services("ns").Create(ctx, service("ns", "b", clusterIPs("10.96.0.2")), metav1.CreateOptions{}))
	eventually(t, "b without endpoints", func() bool { _, ok := byFrontend(t, objs, fe("10.96.0.2", 80, tcp)); return ok })
	must[*discovery.EndpointSlice](t)(epss.Create(ctx, epSlice("ns", "b", "b-1", v4, hp, ep("10.244.1.1"), ep("10.244.1.2")), metav1.CreateOptions{}))
	select {
	case ev := <-h.recorder.Events:
		if !strings.Contains(ev, ReasonMapFull) {
			t.Errorf("event = %q", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no ServiceLBMapFull event")
	}
	if s := frontend(t, objs, fe("10.96.0.2", 80, tcp)); len(s.Backends) != 0 {
		t.Errorf("b = %v, want its previous (empty) backend set kept", s.Backends)
	}
	if s := frontend(t, objs, fe("10.96.0.1", 80, tcp)); len(s.Backends) != 3 {
		t.Errorf("a = %v, want untouched", s.Backends)
	}
	if errs := h.syncer.Errors(); len(errs) != 1 || !strings.Contains(errs[0], "ns/b") {
		t.Errorf("Errors = %q", errs)
	}

	// a shrinks to one backend: b fits now.
	sl := must[*discovery.EndpointSlice](t)(epss.Get(ctx, "a-1", metav1.GetOptions{}))
	sl.Endpoints = sl.Endpoints[:1]
	must[*discovery.EndpointSlice](t)(epss.Update(ctx, sl, metav1.UpdateOptions{}))
	eventually(t, "b programmed", func() bool {
		s, ok := byFrontend(t, objs, fe("10.96.0.2", 80, tcp))
		return ok && len(s.Backends) == 2
	})
	eventually(t, "error cleared", func() bool { return len(h.syncer.Errors()) == 0 })
}

// services reads every datapath service; a read error fails the test.
func services(t *testing.T, dp Datapath) map[uint32]socklb.Service {
	t.Helper()
	svcs, err := dp.Services()
	if err != nil {
		t.Fatalf("read datapath services: %v", err)
	}
	return svcs
}

// frontend is the service holding f; a missing one fails the test, so a
// check on its backends never passes on an empty zero value.
func frontend(t *testing.T, dp Datapath, f socklb.Frontend) socklb.Service {
	t.Helper()
	s, ok := byFrontend(t, dp, f)
	if !ok {
		t.Fatalf("frontend %s:%d/%d not in the datapath", f.IP, f.Port, f.Proto)
	}
	return s
}

func checkMaps(t *testing.T, dp Datapath, want map[socklb.Frontend][]socklb.Backend) {
	t.Helper()
	svcs := services(t, dp)
	got := map[socklb.Frontend][]socklb.Backend{}
	for _, s := range svcs {
		for _, f := range s.Frontends {
			got[f] = normalize(s).Backends
		}
	}
	var diffs []string
	for f, b := range want {
		if !slices.Equal(got[f], normalize(socklb.Service{Backends: b}).Backends) {
			diffs = append(diffs, f.IP.String()+" got "+strings.TrimSpace(strings.Join(beStrings(got[f]), ","))+" want "+strings.Join(beStrings(b), ","))
		}
	}
	for f := range got {
		if _, ok := want[f]; !ok {
			diffs = append(diffs, "unexpected frontend "+f.IP.String())
		}
	}
	sort.Strings(diffs)
	for _, d := range diffs {
		t.Error(d)
	}
}

func beStrings(bs []socklb.Backend) []string {
	var out []string
	for _, b := range bs {
		out = append(out, b.IP.String())
	}
	return out
}
