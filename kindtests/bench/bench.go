//go:build linux

// Package bench compares connect-time service load balancing (our socket LB)
// with a direct connect and with real kube-proxy in iptables and nftables
// modes, side by side on one machine, inside private network namespaces.
package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

// Datapath modes, in table column order.
const (
	ModeDirect   = "direct"
	ModeSocklb   = "socklb"
	ModeIptables = "iptables"
	ModeNftables = "nftables"
	// ModeNetpol is the NetworkPolicy bench (netpol.go): its own netns and
	// columns, no control plane.
	ModeNetpol = "netpol"
	// ModeL7 is the L7 bench (l7.go): HTTP direct, through Envoy by
	// bpf/sockmap, through Envoy by iptables REDIRECT; its own netns.
	ModeL7 = "l7"
	// ModeLBTrace is the socket LB trace bench (lbtrace.go): connect()
	// with trace events on vs off; its own netns, no control plane.
	ModeLBTrace = "lbtrace"
)

// AllModes is every mode in column order.
var AllModes = []string{ModeDirect, ModeSocklb, ModeIptables, ModeNftables, ModeNetpol, ModeL7, ModeLBTrace}

// serviceModes are the modes of the Service table.
func serviceModes(modes []string) []string {
	var out []string
	for _, m := range modes {
		if m != ModeNetpol && m != ModeL7 && m != ModeLBTrace {
			out = append(out, m)
		}
	}
	return out
}

// Options configure a run.
type Options struct {
	Scales        []int
	Modes         []string
	Out           string // results dir; "" writes nothing
	BulkServices  int    // 0 skips the bulk (create -> all answering) phase
	BulkEndpoints int
	Changes       int // endpoint changes timed per mode; 0 skips
	LatCount      int // connects per latency sample
	// Rounds: rounds per scale of the Service table, each measuring every
	// mode once in a rotated order; cells are the median over the rounds.
	Rounds  int
	Workers int // parallel API writers
	// ModeTimeout bounds how long a datapath may take to program a scale
	// point before it is recorded n/a.
	ModeTimeout time.Duration
	KubeBinDir  string
	Etcd        string
	Log         *slog.Logger
	// PolicyScales are the numbers of CIDRs (besides the client's) in the
	// policy selecting the server pod (mode netpol).
	PolicyScales []int
	NetpolConns  int           // connections per netpol sample
	NetpolRR     time.Duration // UDP request/response time per netpol sample
	NetpolFlows  time.Duration // UDP new-flow time per netpol sample
	// NetpolRounds: rounds per scale, each measuring every policy datapath
	// once in a rotated order; cells are the median over the rounds.
	NetpolRounds int
	// L7Conns are the numbers of keep-alive connections of the L7 rows
	// (mode l7); L7Duration the load time per sample; L7Rounds the rounds
	// per number of connections; L7Changes the L7Policy changes timed.
	L7Conns    []int
	L7Duration time.Duration
	L7Rounds   int
	L7Changes  int
	// LBTraceRounds: rounds of the LB trace rows (mode lbtrace), each
	// measuring tracing on and off in a rotated order; LatCount connects
	// per sample.
	LBTraceRounds int
	// LBTracePin runs the client and server on CPU 0 and the harness
	// (the reader) on CPU 1 (needs 2 CPUs).
	LBTracePin bool
	// OnEnv is called with the run id once the environment exists (tests
	// check later that nothing with that id is left).
	OnEnv func(id string)
}

func (o *Options) defaults() {
	if o.BulkEndpoints == 0 {
		o.BulkEndpoints = 5
	}
	if o.LatCount == 0 {
		o.LatCount = 5000
	}
	if o.Rounds == 0 {
		o.Rounds = 3
	}
	if o.Workers == 0 {
		o.Workers = 32
	}
	if o.ModeTimeout == 0 {
		o.ModeTimeout = 10 * time.Minute
	}
	if o.KubeBinDir == "" {
		o.KubeBinDir = k8sbin.BinDir()
	}
	if o.Etcd == "" {
		o.Etcd = "/usr/bin/etcd"
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if len(o.PolicyScales) == 0 {
		o.PolicyScales = []int{0, 10, 1000, 10000}
	}
	if o.NetpolConns == 0 {
		o.NetpolConns = 3000
	}
	if o.NetpolRR == 0 {
		o.NetpolRR = 1500 * time.Millisecond
	}
	if o.NetpolFlows == 0 {
		o.NetpolFlows = o.NetpolRR
	}
	if o.NetpolRounds == 0 {
		o.NetpolRounds = 5
	}
	if len(o.L7Conns) == 0 {
		o.L7Conns = []int{1, 8}
	}
	if o.L7Duration == 0 {
		o.L7Duration = 3 * time.Second
	}
	if o.L7Rounds == 0 {
		o.L7Rounds = 6
	}
	if o.L7Changes == 0 {
		o.L7Changes = 50
	}
	if o.LBTraceRounds == 0 {
		o.LBTraceRounds = 10
	}
}

func (o *Options) has(mode string) bool { return slices.Contains(o.Modes, mode) }

// Run builds the environment, measures, writes results as it goes and tears
// everything down, also when ctx is cancelled. The Service modes, the
// netpol mode and the l7 mode run one after the other, each in its own
// netns; a run of only some of them keeps the others' results already in
// o.Out.
func Run(ctx context.Context, o Options) (*Results, error) {
	o.defaults()
	for _, m := range o.Modes {
		if !slices.Contains(AllModes, m) {
			return nil, fmt.Errorf("unknown mode %q (known: %s)", m, strings.Join(AllModes, ","))
		}
	}
	res := newResults(o)
	svc := serviceModes(o.Modes)
	res.carryOver(o.Out, len(svc) > 0, o.has(ModeNetpol), o.has(ModeL7), o.Log)
	var err error
	if len(svc) > 0 {
		so := o
		so.Modes = svc
		err = runServices(ctx, so, res)
	}
	if o.has(ModeNetpol) && ctx.Err() == nil {
		err = errors.Join(err, runNetpol(ctx, o, res))
	}
	if o.has(ModeL7) && ctx.Err() == nil {
		err = errors.Join(err, runL7(ctx, o, res))
	}
	if o.has(ModeLBTrace) && ctx.Err() == nil {
		err = errors.Join(err, runLBTrace(ctx, o))
	}
	return res, err
}

func runServices(ctx context.Context, o Options, res *Results) error {
	e, err := newEnv(ctx, o.Log)
	if err != nil {
		return err
	}
	res.KubeProxy = toolVersion(filepath.Join(o.KubeBinDir, "kube-proxy"), "--version")
	res.Etcd = toolVersion(o.Etcd, "--version")
	r := &runner{o: o, e: e, res: res, log: o.Log}
	return runIn(ctx, o, res, e, e.close, []string{"worker-plain", "worker-socklb"}, func() error { return r.run(ctx) })
}

// runIn runs body in the environment e of one table: OnEnv learns the run's
// id; an interrupt kills the named workers, since a worker blocked in a long
// sweep or wait would keep the run from reaching teardown; afterwards
// closeEnv removes the environment and the results are written, also after
// an error.
func runIn(ctx context.Context, o Options, res *Results, e *env, closeEnv func() error, workers []string, body func() error) (err error) {
	if o.OnEnv != nil {
		o.OnEnv(e.id)
	}
	defer func() {
		if cerr := closeEnv(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		res.write(o.Out, o.Log)
	}()
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			for _, w := range workers {
				e.stop(w, time.Second)
			}
		case <-done:
		}
	}()
	return body()
}

type runner struct {
	o          Options
	e          *env
	res        *Results
	log        *slog.Logger
	client     kubernetes.Interface
	kubeconfig string
	plain      *proc // worker in the client netns
	cg         *proc // worker in the client netns and the test cgroup
}

func (r *runner) run(ctx context.Context) error {
	e := r.e
	t0 := time.Now()
	if _, err := e.start("server", startOpts{netns: e.nsB, env: []string{childEnv + "=server"}}, e.self, e.marker()); err != nil {
		return err
	}
	kc, err := e.startControlPlane(r.o.KubeBinDir, r.o.Etcd)
	if err != nil {
		return err
	}
	r.kubeconfig = kc
	if r.client, err = e.apiClient(5000); err != nil {
		return err
	}
	if err := waitReady(ctx, r.client, 2*time.Minute, func() error { return e.exited("etcd", "kube-apiserver") }); err != nil {
		return err
	}
	if err := createNode(ctx, r.client); err != nil {
		return err
	}
	r.log.Info("control plane ready", "took", time.Since(t0).Round(time.Millisecond))
	if r.plain, err = e.start("worker-plain", startOpts{netns: e.nsC, stdin: true, env: []string{childEnv + "=worker"}}, e.self, e.marker()); err != nil {
		return err
	}
	if r.o.has(ModeSocklb) {
		if r.cg, err = e.start("worker-socklb", startOpts{netns: e.nsC, stdin: true, cgroup: e.cgFD, env: []string{childEnv + "=worker"}}, e.self, e.marker()); err != nil {
			return err
		}
	}
	if _, err := churnSet.create(ctx, r.client, 0, 1, 1, nil); err != nil {
		return err
	}
	// The churn Service points at 10.123.0.2x, apart from the others.
	if err := r.setChurnBackend(ctx, churnA); err != nil {
		return err
	}

	controllers := []string{}
	for _, m := range []string{ModeSocklb, ModeIptables, ModeNftables} {
		if r.o.has(m) {
			controllers = append(controllers, m)
		}
	}
	if r.o.BulkServices > 0 || r.o.Changes > 0 {
		for _, m := range controllers {
			if err := r.bulkAndChurn(ctx, m); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.log.Error("bulk/churn phase", "mode", m, "err", err)
				r.res.Bulk[m] = Bulk{NA: err.Error()}
			}
			r.res.write(r.o.Out, r.log)
		}
	}

	created := 0
	for _, n := range r.o.Scales {
		if n > created {
			d, err := scaleSet.create(ctx, r.client, created, n, r.o.Workers, func(done int) {
				r.log.Info("creating scale services", "done", done, "target", n)
			})
			if err != nil {
				return err
			}
			r.log.Info("scale services created", "services", n, "took", d.Round(time.Millisecond),
				"perSecond", int(float64(n-created)/d.Seconds()))
			r.res.CreateSeconds[n] = d.Seconds()
			created = n
		}
		byMode, err := measureRounds(r.o.Rounds, r.o.Modes, func(round, slot int, m string) (ServiceSample, error) {
			t := time.Now()
			s := r.scalePoint(ctx, m, n)
			if ctx.Err() != nil {
				return s, ctx.Err()
			}
			s.Round, s.Slot, s.Seconds = round, slot, time.Since(t).Seconds()
			r.log.Info("scale sample", "mode", m, "services", n, "round", fmt.Sprintf("%d/%d", round+1, r.o.Rounds), "slot", slot,
				"p50us", s.P50us, "p99us", s.P99us, "connPerSec", int(s.ConnPerSec), "programSeconds", s.ProgramSeconds, "na", s.NA)
			return s, nil
		})
		if err != nil {
			return err
		}
		for _, m := range r.o.Modes {
			p := aggregatePoint(m, n, byMode[m])
			r.res.Scale = append(r.res.Scale, p)
			r.log.Info("scale point (median over rounds)", "mode", m, "services", n, "rounds", fmt.Sprintf("%d/%d", p.Rounds, len(p.Samples)),
				"p50us", p.P50us, "p99us", p.P99us, "connPerSec", int(p.ConnPerSec), "programSeconds", p.ProgramSeconds, "na", p.NA)
		}
		r.res.write(r.o.Out, r.log)
	}
	r.log.Info("bench done", "took", time.Since(t0).Round(time.Second))
	return nil
}

// marker is a dummy trailing argument that names the run, so a leftover
// child is recognisable in ps and in Leftovers.
func (e *env) marker() string { return namePrefix + e.id }

func (e *env) exited(names ...string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, n := range names {
		if p := e.procs[n]; p != nil && p.exited() {
			return fmt.Errorf("%s exited: %v: %s", n, p.err, e.logTail(n))
		}
	}
	return nil
}

var (
	churnA = "10.123.0.30"
	churnB = "10.123.0.31"
)

func (r *runner) setChurnBackend(ctx context.Context, ip string) error {
	sl := churnSet.slice(0, ip)
	cur, err := r.client.DiscoveryV1().EndpointSlices(churnSet.ns).Get(ctx, sl.Name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	cur.Endpoints = []discovery.Endpoint{{Addresses: []string{ip}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}}}
	_, err = r.client.DiscoveryV1().EndpointSlices(churnSet.ns).Update(ctx, cur, metav1.UpdateOptions{})
	return err
}

func (r *runner) worker(mode string) *proc {
	if mode == ModeSocklb {
		return r.cg
	}
	return r.plain
}

// startDatapath starts the controller of mode and waits until the churn
// Service answers through it. It returns the process and a stop function
// that also removes every rule it left in the client netns.
func (r *runner) startDatapath(ctx context.Context, mode string, timeout time.Duration) (*proc, func(), error) {
	e := r.e
	var p *proc
	var err error
	name := "kube-proxy-" + mode
	switch mode {
	case ModeSocklb:
		name = "socklb-agent"
		p, err = e.start(name, startOpts{netns: e.nsC, extra: []*os.File{e.cgFD}, env: []string{
			childEnv + "=agent", "KEBPF_BENCH_KUBECONFIG=" + r.kubeconfig,
			"KEBPF_BENCH_PIN_DIR=" + filepath.Join(e.bpffs, "kubectl-ebpf")}}, e.self, e.marker())
	case ModeIptables, ModeNftables:
		cfg := filepath.Join(e.dir, "kube-proxy-"+mode+".yaml")
		if err := os.WriteFile(cfg, []byte(kubeProxyConfig(mode, r.kubeconfig)), 0o600); err != nil {
			return nil, nil, err
		}
		// ip netns exec gives kube-proxy a /sys of its own netns.
		p, err = e.start(name, startOpts{netns: e.nsC, ipExec: true}, filepath.Join(r.o.KubeBinDir, "kube-proxy"), "--config", cfg)
	default:
		return nil, nil, fmt.Errorf("mode %s has no controller", mode)
	}
	if err != nil {
		return nil, nil, err
	}
	stop := func() {
		e.stop(name, 20*time.Second)
		if mode != ModeSocklb {
			// The netns is ours alone: flushing its whole ruleset removes
			// exactly what this kube-proxy wrote, in either backend.
			_ = run(context.Background(), "ip", "netns", "exec", e.nsC, "nft", "flush", "ruleset")
			_ = run(context.Background(), "ip", "netns", "exec", e.nsC, "conntrack", "-F")
		}
	}
	w := r.worker(mode)
	errc := make(chan error, 1)
	go func() {
		_, err := w.call(workerReq{Op: "wait", Addr: churnSet.addr(0), TimeoutMs: int(timeout / time.Millisecond)})
		errc <- err
	}()
	for {
		select {
		case err := <-errc:
			if err != nil {
				stop()
				return nil, nil, fmt.Errorf("%s never served the probe Service: %w: %s", mode, err, e.logTail(name))
			}
			return p, stop, nil
		case <-time.After(500 * time.Millisecond):
			if p.exited() {
				<-errc
				stop()
				return nil, nil, fmt.Errorf("%s exited: %v: %s", name, p.err, e.logTail(name))
			}
		case <-ctx.Done():
			// The worker's answer is never read: the run is over and
			// teardown kills the worker.
			stop()
			return nil, nil, ctx.Err()
		}
	}
}

// kubeProxyConfig is kube-proxy's defaults (what users run) in the client
// netns, with the host's conntrack sysctls left alone.
func kubeProxyConfig(mode, kubeconfig string) string {
	return k8sbin.KubeProxy{Kubeconfig: kubeconfig, Mode: mode, Hostname: nodeName, NodeIP: clientIP}.Config()
}

// bulkAndChurn: with the datapath running, create BulkServices x
// BulkEndpoints and time until every one answers; read RSS; time endpoint
// changes; then remove the bulk Services again.
func (r *runner) bulkAndChurn(ctx context.Context, mode string) error {
	p, stop, err := r.startDatapath(ctx, mode, 2*time.Minute)
	if err != nil {
		return err
	}
	defer stop()
	w := r.worker(mode)
	n := r.o.BulkServices
	set := bulkSet
	set.eps = r.o.BulkEndpoints
	b := Bulk{Services: n, Endpoints: set.eps}
	if n > 0 {
		r.log.Info("bulk phase: creating services with the datapath running", "mode", mode, "services", n, "endpoints", set.eps)
		if err := w.send(workerReq{Op: "sweep", Base: set.ip(0).String(), N: n, Port: svcPort, TimeoutMs: int(r.o.ModeTimeout / time.Millisecond)}); err != nil {
			return err
		}
		startMono := monoNow()
		d, cerr := set.create(ctx, r.client, 0, n, r.o.Workers, nil)
		endMono := monoNow()
		resp, err := w.recv()
		if cerr != nil {
			return cerr
		}
		if err != nil {
			return fmt.Errorf("bulk sweep: %w", err)
		}
		b.CreateSeconds = d.Seconds()
		b.AllAnsweringSeconds = float64(resp.Mono-startMono) / 1e9
		b.LagSeconds = max(0, float64(resp.Mono-endMono)/1e9)
		b.RSSKB = rssKB(p.pid())
		r.log.Info("bulk phase done", "mode", mode, "create", d.Round(time.Millisecond),
			"allAnswering", time.Duration(resp.Mono-startMono).Round(time.Millisecond),
			"lagAfterLastCreate", time.Duration(max(0, resp.Mono-endMono)).Round(time.Millisecond), "rssKB", b.RSSKB)
	}
	if r.o.Changes > 0 {
		var lat []float64
		ip := churnA
		for i := 0; i < r.o.Changes; i++ {
			if ip == churnA {
				ip = churnB
			} else {
				ip = churnA
			}
			want := fmt.Sprintf("%s:%d", ip, backendPort)
			if err := w.send(workerReq{Op: "wait", Addr: churnSet.addr(0), Expect: want, TimeoutMs: 30000}); err != nil {
				return err
			}
			before := monoNow()
			uerr := r.setChurnBackend(ctx, ip)
			resp, err := w.recv()
			if uerr != nil {
				return fmt.Errorf("update churn slice: %w", uerr)
			}
			if err != nil {
				return fmt.Errorf("endpoint change %d: %w", i, err)
			}
			lat = append(lat, float64(resp.Mono-before)/1e6)
		}
		b.Changes = len(lat)
		b.ChangeP50ms, b.ChangeP99ms, b.ChangeMaxms = quantiles(lat)
		r.log.Info("endpoint changes", "mode", mode, "n", len(lat), "p50ms", b.ChangeP50ms, "p99ms", b.ChangeP99ms)
	}
	r.res.Bulk[mode] = b
	if n > 0 {
		t := time.Now()
		if err := set.deleteRange(ctx, r.client, 0, n, r.o.Workers); err != nil {
			return err
		}
		r.log.Info("bulk services deleted", "took", time.Since(t).Round(time.Millisecond))
	}
	return nil
}

// scalePoint measures one mode at n Services once: program time from a cold
// controller start to the last Service answering, then connect() latency to
// that last Service.
func (r *runner) scalePoint(ctx context.Context, mode string, n int) ServiceSample {
	var pt ServiceSample
	last := scaleSet.addr(n - 1)
	if mode == ModeDirect {
		last = fmt.Sprintf("%s:%d", backendOf(n-1, 0), backendPort)
	} else {
		t := time.Now()
		p, stop, err := r.startDatapath(ctx, mode, r.o.ModeTimeout)
		if err != nil {
			pt.NA = err.Error()
			return pt
		}
		defer stop()
		if _, err := r.worker(mode).call(workerReq{Op: "wait", Addr: last, TimeoutMs: int((r.o.ModeTimeout - time.Since(t)) / time.Millisecond)}); err != nil {
			pt.NA = fmt.Sprintf("not programmed within %s: %v", r.o.ModeTimeout, err)
			return pt
		}
		pt.ProgramSeconds = time.Since(t).Seconds()
		pt.RSSKB = rssKB(p.pid())
	}
	resp, err := r.worker(mode).call(workerReq{Op: "lat", Addr: last, Count: r.o.LatCount})
	if err != nil && resp.P50us == 0 {
		pt.NA = err.Error()
		return pt
	}
	pt.P50us, pt.P99us, pt.ConnPerSec, pt.Errors = resp.P50us, resp.P99us, resp.ConnPerSec, resp.Errors
	return pt
}
