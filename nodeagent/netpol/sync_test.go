package netpol

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/apisync"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

type dpCall struct {
	op string // "apply" or "delete"
	id uint32
	ep dp.EndpointPolicy
	at time.Time
}

// fakeDatapath records calls; failNext makes the next ApplyEndpoint fail.
type fakeDatapath struct {
	mu       sync.Mutex
	calls    []dpCall
	state    map[uint32]dp.EndpointPolicy
	hostIPs  []netip.Addr
	failNext error
}

func (f *fakeDatapath) ApplyEndpoint(p dp.EndpointPolicy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	f.calls = append(f.calls, dpCall{op: "apply", id: p.ID, ep: p, at: time.Now()})
	f.state[p.ID] = p
	return nil
}

func (f *fakeDatapath) DeleteEndpoint(id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, dpCall{op: "delete", id: id, at: time.Now()})
	delete(f.state, id)
	return nil
}

func (f *fakeDatapath) SetHostIPs(ips []netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hostIPs = ips
	return nil
}

func (f *fakeDatapath) take() []dpCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

// fakeInterfaces: ifindex = 100 + last byte of the first IPv4, as if every
// pod IP had its veth.
type fakeInterfaces struct{}

func (fakeInterfaces) IfIndex(ips []netip.Addr) (int, error) {
	for _, ip := range ips {
		if ip.Is4() {
			return 100 + int(ip.As4()[3]), nil
		}
	}
	return 0, nil
}

type syncHarness struct {
	t      *testing.T
	client *fake.Clientset
	dp     *fakeDatapath
	s      *Syncer
	syncs  chan SyncResult
	names  map[uint32]string
}

func startSyncer(t *testing.T, mod func(*Options), objs ...runtime.Object) *syncHarness {
	t.Helper()
	h := &syncHarness{t: t, client: fake.NewClientset(objs...), dp: &fakeDatapath{state: map[uint32]dp.EndpointPolicy{}},
		syncs: make(chan SyncResult, 100)}
	opts := Options{
		Base: apisync.Base{Client: h.client, NodeName: testNode,
			Recorder: record.NewFakeRecorder(100), Log: slog.New(slog.NewTextHandler(io.Discard, nil))},
		Datapath: h.dp, Interfaces: fakeInterfaces{},
		NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.2")},
		OnSync: func(r SyncResult) {
			select {
			case h.syncs <- r:
			default:
			}
		},
	}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.Run(ctx); err != nil {
			t.Errorf("run: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case r := <-h.syncs:
		if !r.Full || r.Err != nil {
			t.Fatalf("first sync: %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no first sync")
	}
	return h
}

// settle waits for at least n datapath calls (up to a few seconds: the
// machine may be loaded), then until no sync has run for a while, and
// returns the calls made since the last settle.
func (h *syncHarness) settle(n int) []dpCall {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		h.dp.mu.Lock()
		got := len(h.dp.calls)
		h.dp.mu.Unlock()
		if got >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	for {
		select {
		case r := <-h.syncs:
			if r.Err != nil {
				h.t.Logf("sync error (retried): %v", r.Err)
			}
		case <-time.After(150 * time.Millisecond):
			return h.dp.take()
		}
	}
}

var syncPods = []string{"x/a", "x/b", "y/c", "y/r"}

// summary names the calls' endpoints by pod; names is taken before any
// pod is deleted, as deletion releases the ID.
func (h *syncHarness) summary(calls []dpCall) []string {
	if h.names == nil {
		h.names = map[uint32]string{}
		for _, p := range syncPods {
			ns, n, _ := splitKey(p)
			h.names[h.s.ids.Endpoint(types.UID(ns+"-"+n))] = p
		}
	}
	var out []string
	for _, c := range calls {
		out = append(out, c.op+" "+h.names[c.id])
	}
	sort.Strings(out)
	return out
}

func TestSyncIncremental(t *testing.T) {
	pod := func(ns, name, node, ip string, lbl map[string]string) *corev1.Pod {
		return mkPod(podSpec{ns: ns, name: name, node: node, ips: []string{ip}, labels: lbl,
			ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}})
	}
	h := startSyncer(t, nil,
		mkNamespace("x", map[string]string{"team": "x"}), mkNamespace("y", map[string]string{"team": "y"}),
		pod("x", "a", testNode, "10.0.0.10", map[string]string{"app": "a"}),
		pod("x", "b", testNode, "10.0.0.11", map[string]string{"app": "b"}),
		pod("y", "c", testNode, "10.0.0.20", map[string]string{"app": "c"}),
		pod("y", "r", "node-2", "10.0.0.30", map[string]string{"app": "r"}),
	)
	if got, want := h.summary(h.settle(3)), []string{"apply x/a", "apply x/b", "apply y/c"}; !slices.Equal(got, want) {
		t.Fatalf("initial sync: %v, want %v", got, want)
	}
	if h.dp.hostIPs == nil {
		t.Fatal("host IPs not set")
	}
	ctx := context.Background()
	nps := h.client.NetworkingV1().NetworkPolicies
	pods := h.client.CoreV1().Pods
	getPod := func(ns, name string) *corev1.Pod {
		p, err := pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	policy := func(t *testing.T, doc string) *networkingv1.NetworkPolicy { return mustPolicy(t, doc) }

	steps := []struct {
		name string
		do   func(t *testing.T) error
		want []string
	}{
		{"policy add selects x/a", func(t *testing.T) error {
			_, err := nps("x").Create(ctx, policy(t, "metadata: {name: deny}\nspec: {podSelector: {matchLabels: {app: a}}}"), metav1.CreateOptions{})
			return err
		}, []string{"apply x/a"}},
		{"policy update selects x/b too; x/a unchanged", func(t *testing.T) error {
			_, err := nps("x").Update(ctx, policy(t, "metadata: {name: deny}\nspec: {podSelector: {}}"), metav1.UpdateOptions{})
			return err
		}, []string{"apply x/b"}},
		{"policy in y with a namespaceSelector", func(t *testing.T) error {
			_, err := nps("y").Create(ctx, policy(t, "metadata: {name: from-x, namespace: 'y'}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: x}}}]}]}"), metav1.CreateOptions{})
			return err
		}, []string{"apply y/c"}},
		{"policy whose peers match nothing changes no endpoint", func(t *testing.T) error {
			_, err := nps("x").Create(ctx, policy(t, "metadata: {name: from-clients}\nspec: {podSelector: {matchLabels: {app: b}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]}"), metav1.CreateOptions{})
			return err
		}, nil},
		{"remote pod label change makes it a peer of x/b", func(t *testing.T) error {
			p := getPod("y", "r")
			p.Labels = map[string]string{"app": "r", "role": "client"}
			_, err := pods("y").Update(ctx, p, metav1.UpdateOptions{})
			return err
		}, []string{"apply x/b"}},
		{"namespace label change makes y's pods peers of y/c", func(t *testing.T) error {
			n, err := h.client.CoreV1().Namespaces().Get(ctx, "y", metav1.GetOptions{})
			if err != nil {
				return err
			}
			n.Labels = map[string]string{"team": "x"}
			_, err = h.client.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{})
			return err
		}, []string{"apply y/c"}},
		{"remote pod IP change", func(t *testing.T) error {
			p := getPod("y", "r")
			p.Status.PodIP, p.Status.PodIPs = "10.0.0.31", []corev1.PodIP{{IP: "10.0.0.31"}}
			_, err := pods("y").UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		}, []string{"apply x/b", "apply y/c"}},
		{"status-only pod update changes nothing", func(t *testing.T) error {
			p := getPod("y", "r")
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
			_, err := pods("y").UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		}, nil},
		{"local pod restarts with a new IP (and interface)", func(t *testing.T) error {
			p := getPod("x", "a")
			p.Status.PodIP, p.Status.PodIPs = "10.0.0.12", []corev1.PodIP{{IP: "10.0.0.12"}}
			_, err := pods("x").UpdateStatus(ctx, p, metav1.UpdateOptions{})
			return err
		}, []string{"apply x/a", "apply y/c"}},
		{"remote pod deletion", func(t *testing.T) error {
			return pods("y").Delete(ctx, "r", metav1.DeleteOptions{})
		}, []string{"apply x/b", "apply y/c"}},
		{"local pod deletion", func(t *testing.T) error {
			return pods("x").Delete(ctx, "a", metav1.DeleteOptions{})
		}, []string{"apply y/c", "delete x/a"}},
		{"policy deletion", func(t *testing.T) error {
			return nps("y").Delete(ctx, "from-x", metav1.DeleteOptions{})
		}, []string{"apply y/c"}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			start := time.Now()
			if err := st.do(t); err != nil {
				t.Fatal(err)
			}
			calls := h.settle(len(st.want))
			if got := h.summary(calls); !slices.Equal(got, st.want) {
				t.Fatalf("datapath calls %v, want %v", got, st.want)
			}
			if len(calls) > 0 {
				t.Logf("API call -> first datapath write: %v", calls[0].at.Sub(start))
			}
		})
	}
	assertMatchesFullCompile(t, h)
}

// assertMatchesFullCompile: what the incremental syncs left programmed is
// what one full compilation of the caches gives.
func assertMatchesFullCompile(t *testing.T, h *syncHarness) {
	t.Helper()
	in := Inputs{NodeName: testNode, IDs: h.s.ids, IfIndex: func(p *corev1.Pod) int {
		i, _ := fakeInterfaces{}.IfIndex(PodIPs(p))
		return i
	}}
	src := listerSource{h.s}
	in.Pods, in.Namespaces = src.Pods(""), src.Namespaces()
	in.Policies, _ = h.s.npLister.List(labels.Everything())
	want, _ := Compile(in)
	h.dp.mu.Lock()
	defer h.dp.mu.Unlock()
	if !reflect.DeepEqual(h.dp.state, want) {
		t.Fatalf("programmed\n%s\nfull compile\n%s", dump(h.dp.state), dump(want))
	}
}

func TestSyncRetriesAfterDatapathError(t *testing.T) {
	h := startSyncer(t, func(o *Options) { o.Intervals.Retry = 10 * time.Millisecond }, mkNamespace("x", nil),
		mkPod(podSpec{ns: "x", name: "a", node: testNode, ips: []string{"10.0.0.10"}}))
	h.settle(1)
	h.dp.mu.Lock()
	h.dp.failNext = errors.New("injected")
	h.dp.mu.Unlock()
	if _, err := h.client.NetworkingV1().NetworkPolicies("x").Create(context.Background(),
		mustPolicy(t, "metadata: {name: deny}\nspec: {podSelector: {}}"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
	var sawErr bool
	for {
		select {
		case r := <-h.syncs:
			if r.Err != nil {
				sawErr = true
				if len(h.s.Errors()) == 0 {
					t.Fatal("sync error not reported by Errors")
				}
			}
			if sawErr && r.Err == nil && r.Full && r.Applied == 1 {
				assertMatchesFullCompile(t, h)
				if errs := h.s.Errors(); len(errs) != 0 {
					t.Fatalf("errors after recovery: %v", errs)
				}
				return
			}
		case <-deadline:
			t.Fatalf("no full resync after the failure (saw error %v)", sawErr)
		}
	}
}

// TestSyncTooManyRulesFailsClosed: a tightening policy that does not fit
// the datapath must not leave the looser one in force: the direction denies
// everything (and Errors says why) until it fits again.
func TestSyncTooManyRulesFailsClosed(t *testing.T) {
	h := startSyncer(t, nil, mkNamespace("x", nil),
		mkPod(podSpec{ns: "x", name: "a", node: testNode, ips: []string{"10.0.0.10"}}))
	h.settle(1)
	ctx := context.Background()
	if _, err := h.client.NetworkingV1().NetworkPolicies("x").Create(ctx,
		mustPolicy(t, "metadata: {name: web}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	before := h.settle(1)
	if len(before) != 1 {
		t.Fatalf("calls %v", before)
	}
	if _, err := h.client.NetworkingV1().NetworkPolicies("x").Create(ctx,
		mustPolicy(t, "metadata: {name: many}\nspec: {podSelector: {}, ingress: [{ports: ["+portList(1000, 2, 17)+"]}]}"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	calls := h.settle(1)
	if len(calls) != 1 || calls[0].op != "apply" {
		t.Fatalf("the fail-closed endpoint was not written: %v", h.summary(calls))
	}
	if ep := calls[0].ep; !ep.IngressEnforced || len(ep.Ingress) != 0 {
		t.Fatalf("endpoint after a policy that does not fit: %+v, want ingress enforced with no allow (deny all)", ep)
	}
	errs := h.s.Errors()
	if len(errs) != 1 || !strings.Contains(errs[0], "fail closed") {
		t.Fatalf("errors %v, want one saying it failed closed", errs)
	}
	if err := h.client.NetworkingV1().NetworkPolicies("x").Delete(ctx, "many", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.settle(1)
	h.dp.mu.Lock()
	got := h.dp.state[before[0].id]
	h.dp.mu.Unlock()
	if !reflect.DeepEqual(got, before[0].ep) {
		t.Fatalf("policy once it fits again: %+v, want %+v", got, before[0].ep)
	}
	if errs := h.s.Errors(); len(errs) != 0 {
		t.Fatalf("problem not cleared: %v", errs)
	}
}

func TestPodByIP(t *testing.T) {
	h := startSyncer(t, nil,
		mkPod(podSpec{ns: "x", name: "old", node: "other", ips: []string{"10.0.0.7"}, phase: corev1.PodSucceeded}),
		mkPod(podSpec{ns: "x", name: "new", node: "other", ips: []string{"10.0.0.7"}}),
		mkPod(podSpec{ns: "y", name: "local", node: testNode, ips: []string{"10.0.0.8", "fd00::8"}}),
		mkPod(podSpec{ns: "kube-system", name: "hostnet", node: testNode, ips: []string{"192.0.2.2"}, hostNetwork: true}),
	)
	for _, tc := range []struct {
		name, ip, want string
	}{
		{"running pod wins over a finished one with the IP", "10.0.0.7", "x/new"},
		{"v4", "10.0.0.8", "y/local"},
		{"v6", "fd00::8", "y/local"},
		{"v4-mapped", "::ffff:10.0.0.8", "y/local"},
		{"host network pod is not named by the node IP", "192.0.2.2", ""},
		{"unknown", "10.9.9.9", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, ok := h.s.PodByIP(netip.MustParseAddr(tc.ip))
			got := ""
			if ok {
				got = k.String()
			}
			if got != tc.want {
				t.Errorf("PodByIP(%s) = %q, want %q", tc.ip, got, tc.want)
			}
		})
	}
}

// TestSyncHostIPsFollowLocalAddresses: the node's addresses are the Node's
// plus its interfaces' (a bridge gateway appears with the first pod); a
// sync after a change updates the datapath, and a failed read keeps what
// is programmed.
func TestSyncHostIPsFollowLocalAddresses(t *testing.T) {
	var mu sync.Mutex
	local := []netip.Addr{netip.MustParseAddr("192.0.2.2")} // the Node address again
	var readErr error
	h := startSyncer(t, func(o *Options) {
		o.LocalIPs = func() ([]netip.Addr, error) {
			mu.Lock()
			defer mu.Unlock()
			return slices.Clone(local), readErr
		}
	})
	hostIPs := func() []string {
		h.dp.mu.Lock()
		defer h.dp.mu.Unlock()
		var out []string
		for _, ip := range h.dp.hostIPs {
			out = append(out, ip.String())
		}
		return out
	}
	if got := hostIPs(); !slices.Equal(got, []string{"192.0.2.2"}) {
		t.Fatalf("first sync host IPs %v, want the Node address once", got)
	}
	resync := func() {
		t.Helper()
		h.s.runner.Request()
		select {
		case <-h.syncs:
		case <-time.After(5 * time.Second):
			t.Fatal("no sync")
		}
	}
	mu.Lock()
	local = append(local, netip.MustParseAddr("10.244.0.1"), netip.MustParseAddr("2001:db8::1"))
	mu.Unlock()
	resync()
	if got := hostIPs(); !slices.Equal(got, []string{"10.244.0.1", "192.0.2.2", "2001:db8::1"}) {
		t.Fatalf("after the bridge appeared: host IPs %v", got)
	}
	mu.Lock()
	local, readErr = nil, errors.New("netlink: interrupted")
	mu.Unlock()
	resync()
	if got := hostIPs(); !slices.Equal(got, []string{"10.244.0.1", "192.0.2.2", "2001:db8::1"}) {
		t.Fatalf("a failed read changed the host IPs to %v", got)
	}
}

// TestSyncIPBlockNamedPortFollowsPods: an egress ipBlock rule with a named
// port depends on which pods the block holds, so a remote pod moving into or
// out of the block (or its except) recompiles the local endpoint, and one
// moving between two addresses the block does not hold does not.
func TestSyncIPBlockNamedPortFollowsPods(t *testing.T) {
	httpPort := []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}
	h := startSyncer(t, nil,
		mkNamespace("x", nil), mkNamespace("y", nil),
		mkPod(podSpec{ns: "x", name: "a", node: testNode, ips: []string{"10.0.0.10"}, labels: map[string]string{"app": "a"}}),
		mkPod(podSpec{ns: "y", name: "r", node: "node-2", ips: []string{"10.0.0.30"}, ports: httpPort}),
		mustPolicy(t, "metadata: {name: to-block, namespace: x}\nspec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.31/32]}}], ports: [{port: http}]}]}"),
	)
	if got := h.summary(h.settle(1)); !slices.Equal(got, []string{"apply x/a"}) {
		t.Fatalf("initial sync: %v", got)
	}
	egressHas := func(prefix string) bool {
		h.dp.mu.Lock()
		defer h.dp.mu.Unlock()
		for _, ep := range h.dp.state {
			for _, e := range ep.Egress {
				if e.Prefix.String() == prefix {
					return true
				}
			}
		}
		return false
	}
	if !egressHas("10.0.0.30/32") {
		t.Fatal("the block's pod exposing http is not allowed")
	}
	ctx := context.Background()
	moveTo := func(ip string) {
		t.Helper()
		p, err := h.client.CoreV1().Pods("y").Get(ctx, "r", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		if _, err := h.client.CoreV1().Pods("y").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, st := range []struct {
		ip      string
		want    []string
		allowed string // the /32 that must be allowed after, "" for none
	}{
		{"10.0.0.31", []string{"apply x/a"}, ""},             // into the except
		{"10.0.1.5", nil, ""},                                // except -> outside: neither held
		{"10.0.0.32", []string{"apply x/a"}, "10.0.0.32/32"}, // back into the block
	} {
		moveTo(st.ip)
		if got := h.summary(h.settle(len(st.want))); !slices.Equal(got, st.want) {
			t.Errorf("remote pod to %s: datapath calls %v, want %v", st.ip, got, st.want)
		}
		if st.allowed != "" && !egressHas(st.allowed) {
			t.Errorf("remote pod at %s: %s not allowed", st.ip, st.allowed)
		}
		if egressHas("10.0.0.31/32") || egressHas("10.0.1.5/32") {
			t.Errorf("remote pod at %s: an address outside the block (or in its except) is allowed", st.ip)
		}
	}
}
