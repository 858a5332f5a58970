//go:build linux

package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/l7"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// The L7 bench (issue 9): keep-alive HTTP/1.1 request/response from a
// client to a pod, in one private netns on loopback,
//
//	(a) direct: the client connects to the pod, no proxy;
//	(b) sockmap: bpf/sockmap rewrites the client's connect() to the real
//	    Envoy, our getsockopt program answers SO_ORIGINAL_DST, sk_msg carries
//	    client <-> Envoy, Envoy -> pod over loopback TCP;
//	(c) redirect: the same Envoy with the same configuration, reached through
//	    iptables nat OUTPUT REDIRECT of the client's cgroup (what an
//	    iptables sidecar does): SO_ORIGINAL_DST from conntrack, loopback TCP
//	    on both hops.
//
// Why REDIRECT is (c) rather than our steering with sk_msg detached: the
// sockops program puts both ends of a steered connection into the SOCKHASH,
// and a socket in a SOCKHASH runs tcp_bpf's send/receive paths even without
// a verdict program (not plain TCP; also the kernel 6.18 read-wakeup
// regression path, bpf/sockmap/README.md); steering without the SOCKHASH
// needs a datapath change. REDIRECT is the plain-TCP path sidecars really
// take, with the same Envoy, listener (original_dst + RBAC), and cluster.
//
// Envoy is configured only through our xds.Server with xds.Build (the
// production listener, no access log), started in its own cgroup that the
// datapath exempts; the client worker runs in the "app" cgroup.

// L7 columns, in table order.
const (
	L7Direct   = "direct"
	L7Sockmap  = "sockmap"
	L7Redirect = "redirect"
)

// L7Columns is every L7 column in order.
var L7Columns = []string{L7Direct, L7Sockmap, L7Redirect}

var l7Title = map[string]string{
	L7Direct:   "(a) direct, no proxy",
	L7Sockmap:  "(b) Envoy via bpf/sockmap (sk_msg, ours)",
	L7Redirect: "(c) Envoy via iptables REDIRECT (TCP)",
}

var (
	l7Pod    = netip.MustParseAddrPort("127.0.0.2:8080")
	l7Listen = netip.MustParseAddrPort("127.0.0.1:15001")
)

const (
	l7Allowed = "/public/" // the prefix the policy allows (GET, HEAD)
	l7Path    = "/public/bench"
	// l7EnvoyCx is Envoy's listener counter of accepted connections: a
	// sample through Envoy must raise it, a direct one must not.
	l7EnvoyCx = "listener.127.0.0.1_15001.downstream_cx_total"
)

// L7Results is the L7 table (mode l7), possibly from another run than the
// other tables (Date).
type L7Results struct {
	Date          string    `json:"date"`
	Machine       Machine   `json:"machine"`
	Envoy         string    `json:"envoyVersion,omitempty"`
	Iptables      string    `json:"iptablesVersion,omitempty"` // column (c)
	Rounds        int       `json:"rounds"`
	SampleSeconds float64   `json:"sampleSeconds"`
	Conns         []int     `json:"connections"`
	Points        []L7Point `json:"points,omitempty"`
	Changes       L7Changes `json:"policyChanges"`
	// Envoy's VmRSS serving the configuration before any load, and after
	// the last load round.
	RSSIdleKB int64  `json:"envoyRSSIdleKB,omitempty"`
	RSSLoadKB int64  `json:"envoyRSSAfterLoadKB,omitempty"`
	NA        string `json:"na,omitempty"`
}

// L7Point is one column at one number of connections: every number is the
// median over the rounds in Samples that produced numbers.
type L7Point struct {
	Column string `json:"column"`
	Conns  int    `json:"connections"`
	L7Numbers
	Rounds  int        `json:"rounds,omitempty"`
	Samples []L7Sample `json:"samples,omitempty"`
}

// L7Sample is one round of one column at one number of connections.
type L7Sample struct {
	RoundSlot
	L7Numbers
}

// L7Numbers are what one load sample yields: latency of every request
// (write to the last byte of the answer read) and answered requests/s.
type L7Numbers struct {
	P50us     float64 `json:"p50us,omitempty"`
	P99us     float64 `json:"p99us,omitempty"`
	ReqPerSec float64 `json:"requestsPerSec,omitempty"`
	Errors    int     `json:"errors,omitempty"`
	NA        string  `json:"na,omitempty"`
}

func (n *L7Numbers) floats() []*float64 { return []*float64{&n.P50us, &n.P99us, &n.ReqPerSec} }

// L7Changes times L7Policy changes: from just before xds.Server.Update with
// a new Build to (ack) the server receiving Envoy's ACK of that version and
// (enforce) the first request on a new connection answered with the new
// verdict (polled every 200µs through the sockmap path).
type L7Changes struct {
	Changes      int     `json:"changes,omitempty"`
	AckP50ms     float64 `json:"ackP50ms,omitempty"`
	AckP99ms     float64 `json:"ackP99ms,omitempty"`
	AckMaxms     float64 `json:"ackMaxms,omitempty"`
	EnforceP50ms float64 `json:"enforceP50ms,omitempty"`
	EnforceP99ms float64 `json:"enforceP99ms,omitempty"`
	EnforceMaxms float64 `json:"enforceMaxms,omitempty"`
	NA           string  `json:"na,omitempty"`
}

// point looks up one L7 measurement.
func (l *L7Results) point(col string, conns int) (L7Point, bool) {
	return find(l.Points, func(p L7Point) bool { return p.Column == col && p.Conns == conns })
}

func aggregateL7(col string, conns int, ss []L7Sample) L7Point {
	p := L7Point{Column: col, Conns: conns, Samples: ss}
	p.Rounds, p.Errors, p.NA = fold(ss, p.floats(), func(s *L7Sample) []*float64 { return s.floats() })
	return p
}

type l7Env struct {
	*env
	ns     string
	app    string // the client's cgroup, relative to the cgroup2 root
	dp     *sockmap.Objects
	ctl    *l7.Control
	envoy  *proc
	admin  *envoytest.Envoy // Envoy's admin API
	worker *proc
}

// newL7Env builds the netns, the cgroups (app and envoy under the run's
// cgroup, where the datapath is attached), a private bpffs with the loaded
// datapath, our xDS server, and starts Envoy, the pod and the client
// worker. On error everything made so far is already removed.
func newL7Env(ctx context.Context, o Options, bin string) (_ *l7Env, err error) {
	base, err := newRunEnv(ctx, o.Log, "-l7")
	if err != nil {
		return nil, err
	}
	p := namePrefix + base.id
	e := &l7Env{env: base, ns: base.netns("-l7"), app: p + "/app"}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if err := run(ctx, "ip", "-n", e.ns, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	e.cgroup = filepath.Join(cgroupRoot, p)
	if e.cgFD, err = e.makeCgroup(e.cgroup); err != nil {
		return nil, err
	}
	appFD, err := e.makeCgroup(filepath.Join(cgroupRoot, e.app))
	if err != nil {
		return nil, err
	}
	envoyCg := filepath.Join(e.cgroup, "envoy")
	envoyFD, err := e.makeCgroup(envoyCg)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(envoyFD.Fd()), &st); err != nil {
		return nil, err
	}

	if err := e.mountBPFFS(); err != nil {
		return nil, err
	}
	dp, err := sockmap.Load(filepath.Join(e.bpffs, "kubectl-ebpf"))
	if err != nil {
		return nil, err
	}
	// Runs before the unmount (undo is reversed): links, pins and maps go.
	e.undo = append(e.undo, func() error {
		if err := dp.Detach(); err != nil {
			return fmt.Errorf("detach sockmap: %w", err)
		}
		return nil
	})
	if err := dp.Attach(e.cgroup); err != nil {
		return nil, err
	}
	// No destination is steered yet: each sample decides.
	if err := l7.Steer(dp, st.Ino, l7Listen); err != nil {
		return nil, err
	}
	e.dp = dp

	if e.ctl, err = l7.NewControl(e.dir, nodeName); err != nil {
		return nil, err
	}
	e.undo = append(e.undo, func() error { e.ctl.Close(); return nil })
	cfg := filepath.Join(e.dir, "envoy-bootstrap.json")
	if err := os.WriteFile(cfg, e.ctl.Bootstrap, 0o600); err != nil {
		return nil, err
	}
	if e.envoy, err = e.start("envoy", startOpts{netns: e.ns, cgroup: envoyFD, env: []string{"KEBPF_NODE=" + nodeName}},
		bin, envoytest.Args(cfg, filepath.Join(e.dir, "envoy-own.log"))...); err != nil {
		return nil, err
	}
	e.admin = &envoytest.Envoy{Admin: e.ctl.Admin}
	if _, err := e.start("l7-server", startOpts{netns: e.ns, env: []string{childEnv + "=l7server"}}, e.self, e.marker()); err != nil {
		return nil, err
	}
	if e.worker, err = e.start("l7-worker", startOpts{netns: e.ns, cgroup: appFD, stdin: true, env: []string{childEnv + "=worker"}}, e.self, e.marker()); err != nil {
		return nil, err
	}
	o.Log.Info("l7 bench environment ready", "id", e.id, "netns", e.ns, "cgroup", e.cgroup, "envoy", bin)
	return e, nil
}

// runL7 measures the L7 table: per number of connections, o.L7Rounds
// rounds, each measuring every column once in an order rotated per round;
// then Envoy's RSS and o.L7Changes policy changes.
func runL7(ctx context.Context, o Options, res *Results) error {
	l := &L7Results{Date: time.Now().UTC().Format(time.RFC3339), Machine: thisMachine(), Rounds: o.L7Rounds,
		SampleSeconds: o.L7Duration.Seconds(), Conns: o.L7Conns}
	res.L7 = l
	bin, why := envoytest.Binary()
	if bin == "" {
		l.NA = why
		return fmt.Errorf("l7: %s (make deps installs Envoy)", why)
	}
	l.Envoy, l.Iptables = envoyVersion(bin), toolVersion("iptables", "--version")
	e, err := newL7Env(ctx, o, bin)
	if err != nil {
		l.NA = err.Error()
		return err
	}
	return runIn(ctx, o, res, e.env, e.close, []string{"l7-worker"}, func() error {
		err := e.measure(ctx, o, res)
		if err != nil && l.NA == "" && len(l.Points) == 0 {
			l.NA = err.Error()
		}
		return err
	})
}

// envoyVersion is what Envoy prints after "version: " (commit/version/
// state/build/TLS library).
func envoyVersion(bin string) string {
	v := toolVersion(bin, "--version")
	if _, after, ok := strings.Cut(v, "version: "); ok {
		return "Envoy " + after
	}
	return v
}

func (e *l7Env) envoyAlive() error { return e.exited("envoy") }

// build is the configuration for the policy allowing GET and HEAD under
// prefixes, linted.
func (e *l7Env) build(prefixes ...string) (*xds.Resources, error) {
	r, err := xds.Build(l7.Input(l7Pod, nodeName, prefixes...), nodeName, xds.Options{ListenAddress: l7Listen})
	if err != nil {
		return nil, err
	}
	return r, xds.Lint(r)
}

func (e *l7Env) measure(ctx context.Context, o Options, res *Results) error {
	l := res.L7
	r0, err := e.build(l7Allowed)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := e.ctl.Server.Update(wctx, nodeName, r0); err != nil {
		return err
	}
	if _, err := e.ctl.WaitAcked(wctx, r0.Version, e.envoyAlive); err != nil {
		return fmt.Errorf("%w: %s", err, e.logTail("envoy"))
	}
	// The listener serves shortly after the ACK (the worker picks it up).
	if err := e.steered(func() error {
		_, err := e.worker.call(workerReq{Op: "verdict", Addr: l7Pod.String(), Path: l7Path, Status: 200, TimeoutMs: 20000})
		return err
	}); err != nil {
		return fmt.Errorf("envoy never answered a steered request: %w: %s", err, e.logTail("envoy"))
	}
	l.RSSIdleKB = rssKB(e.envoy.pid())
	o.Log.Info("l7: envoy serving", "version", r0.Version, "rssKB", l.RSSIdleKB)

	total := len(l.Conns) * len(L7Columns) * l.Rounds
	k, start := 0, time.Now()
	for _, c := range l.Conns {
		by, err := measureRounds(l.Rounds, L7Columns, func(r, slot int, col string) (L7Sample, error) {
			t := time.Now()
			s := e.sample(ctx, col, c, o.L7Duration)
			if ctx.Err() != nil {
				return s, ctx.Err()
			}
			s.Round, s.Slot, s.Seconds = r, slot, time.Since(t).Seconds()
			k++
			o.Log.Info("l7 sample", "progress", fmt.Sprintf("%d/%d", k, total), "elapsed", time.Since(start).Round(time.Second),
				"connections", c, "round", r+1, "column", col, "p50us", s.P50us, "p99us", s.P99us,
				"requestsPerSec", int(s.ReqPerSec), "errors", s.Errors, "na", s.NA)
			return s, nil
		})
		if err != nil {
			return err
		}
		for _, col := range L7Columns {
			p := aggregateL7(col, c, by[col])
			l.Points = append(l.Points, p)
			o.Log.Info("l7 point (median over rounds)", "column", col, "connections", c, "rounds", fmt.Sprintf("%d/%d", p.Rounds, len(p.Samples)),
				"p50us", p.P50us, "p99us", p.P99us, "requestsPerSec", int(p.ReqPerSec), "na", p.NA)
		}
		res.write(o.Out, o.Log)
	}
	l.RSSLoadKB = rssKB(e.envoy.pid())
	l.Changes = e.changes(ctx, o.L7Changes)
	o.Log.Info("l7 policy changes", "changes", l.Changes.Changes, "ackP50ms", l.Changes.AckP50ms, "enforceP50ms", l.Changes.EnforceP50ms,
		"enforceP99ms", l.Changes.EnforceP99ms, "rssIdleKB", l.RSSIdleKB, "rssAfterLoadKB", l.RSSLoadKB, "na", l.Changes.NA)
	return nil
}

// steered runs fn with the pod steered to Envoy by the datapath.
func (e *l7Env) steered(fn func() error) error {
	if err := e.dp.SetSteered(l7Pod); err != nil {
		return err
	}
	return errors.Join(fn(), e.dp.DeleteSteered(l7Pod))
}

// route sends the client's connections to the pod along col's path and
// returns what undoes it.
func (e *l7Env) route(ctx context.Context, col string) (func() error, error) {
	switch col {
	case L7Direct:
		return func() error { return nil }, nil
	case L7Sockmap:
		if err := e.dp.SetSteered(l7Pod); err != nil {
			return nil, err
		}
		return func() error { return e.dp.DeleteSteered(l7Pod) }, nil
	case L7Redirect:
		// Only the client's cgroup: Envoy's own upstream connection to the
		// pod must not come back to it (a sidecar excludes Envoy's UID).
		undo := func() error {
			// The netns is ours alone: its ruleset is this rule.
			return run(context.Background(), "ip", "netns", "exec", e.ns, "nft", "flush", "ruleset")
		}
		err := run(ctx, "ip", "netns", "exec", e.ns, "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
			"-d", l7Pod.Addr().String(), "--dport", fmt.Sprint(l7Pod.Port()), "-m", "cgroup", "--path", e.app,
			"-j", "REDIRECT", "--to-ports", fmt.Sprint(l7Listen.Port()))
		if err != nil {
			return nil, errors.Join(err, undo())
		}
		return undo, nil
	}
	return nil, fmt.Errorf("unknown L7 column %q", col)
}

// l7Counters are what tells the paths apart: the datapath's counters and
// Envoy's accepted connections.
type l7Counters struct {
	dp      sockmap.Stats
	envoyCx int64
}

func (e *l7Env) counters(ctx context.Context) (l7Counters, error) {
	st, err := e.dp.Stats()
	if err != nil {
		return l7Counters{}, err
	}
	cx := e.admin.Stat(ctx, l7EnvoyCx)
	if cx < 0 {
		return l7Counters{}, fmt.Errorf("envoy has no counter %s", l7EnvoyCx)
	}
	return l7Counters{dp: st, envoyCx: cx}, nil
}

// wrongPath says why a sample's connections did not take col's path ("" when
// they did): the sockmap column must be steered and carried by sk_msg into
// Envoy, the REDIRECT column must reach Envoy unsteered, the direct column
// must reach neither.
func wrongPath(col string, conns int, before, after l7Counters) string {
	steered := after.dp.Steered - before.dp.Steered
	redirected := after.dp.Redirected - before.dp.Redirected
	cx := after.envoyCx - before.envoyCx
	switch {
	case col == L7Sockmap && (steered < uint64(conns) || redirected == 0 || cx < int64(conns)):
		return fmt.Sprintf("not through sk_msg: %d steered, %d sk_msg redirects, %d Envoy connections for %d clients", steered, redirected, cx, conns)
	case col == L7Redirect && (steered != 0 || cx < int64(conns)):
		return fmt.Sprintf("not through REDIRECT: %d steered, %d Envoy connections for %d clients", steered, cx, conns)
	case col == L7Direct && (steered != 0 || cx != 0):
		return fmt.Sprintf("not direct: %d steered, %d Envoy connections", steered, cx)
	}
	return ""
}

// sample routes col, runs the load with conns connections for d, checks
// the path the connections took and undoes the routing.
func (e *l7Env) sample(ctx context.Context, col string, conns int, d time.Duration) (s L7Sample) {
	undo, err := e.route(ctx, col)
	if err != nil {
		s.NA = err.Error()
		return s
	}
	defer func() {
		if err := undo(); err != nil && s.NA == "" {
			s.NA = "teardown: " + err.Error()
		}
	}()
	before, err := e.counters(ctx)
	if err != nil {
		s.NA = err.Error()
		return s
	}
	resp, err := e.worker.call(workerReq{Op: "http", Addr: l7Pod.String(), Path: l7Path, Status: 200, Count: conns, TimeoutMs: int(d / time.Millisecond)})
	if err != nil && resp.P50us == 0 {
		s.NA = err.Error()
		return s
	}
	after, err := e.counters(ctx)
	if err != nil {
		s.NA = err.Error()
		return s
	}
	if why := wrongPath(col, conns, before, after); why != "" {
		s.NA = why
		return s
	}
	if miss := after.dp.RedirectMiss - before.dp.RedirectMiss; miss > 0 {
		e.log.Warn("l7: sk_msg found no peer for some writes (they took TCP)", "column", col, "redirectMiss", miss)
	}
	s.P50us, s.P99us, s.ReqPerSec, s.Errors = resp.P50us, resp.P99us, resp.ConnPerSec, resp.Errors
	return s
}

// changes times n L7Policy changes through the sockmap path, alternating
// a policy that denies the bench's path (403) and one that allows it (200);
// every change also allows a path of its own, so every version is new.
func (e *l7Env) changes(ctx context.Context, n int) (ch L7Changes) {
	if n <= 0 {
		return ch
	}
	if err := e.dp.SetSteered(l7Pod); err != nil {
		ch.NA = err.Error()
		return ch
	}
	defer func() {
		if err := e.dp.DeleteSteered(l7Pod); err != nil && ch.NA == "" {
			ch.NA = err.Error()
		}
	}()
	var ack, enforce []float64
	for i := range n {
		prefixes, want := []string{fmt.Sprintf("/change-%d/", i)}, 403
		if i%2 == 1 {
			prefixes, want = append(prefixes, l7Allowed), 200
		}
		r, err := e.build(prefixes...)
		if err != nil {
			ch.NA = fmt.Sprintf("change %d: %v", i+1, err)
			return ch
		}
		// The worker polls (old verdict) until the new one answers.
		if err := e.worker.send(workerReq{Op: "verdict", Addr: l7Pod.String(), Path: l7Path, Status: want, TimeoutMs: 30000}); err != nil {
			ch.NA = err.Error()
			return ch
		}
		t0, m0 := time.Now(), monoNow()
		uerr := e.ctl.Server.Update(ctx, nodeName, r)
		resp, err := e.worker.recv()
		if err = errors.Join(uerr, err); err != nil {
			ch.NA = fmt.Sprintf("change %d (want %d): %v", i+1, want, err)
			return ch
		}
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		at, err := e.ctl.WaitAcked(wctx, r.Version, e.envoyAlive)
		cancel()
		if err != nil {
			ch.NA = fmt.Sprintf("change %d: %v", i+1, err)
			return ch
		}
		ack = append(ack, float64(at.Sub(t0))/1e6)
		enforce = append(enforce, float64(resp.Mono-m0)/1e6)
	}
	ch.Changes = n
	ch.AckP50ms, ch.AckP99ms, ch.AckMaxms = quantiles(ack)
	ch.EnforceP50ms, ch.EnforceP99ms, ch.EnforceMaxms = quantiles(enforce)
	return ch
}

// perRound is f over the rounds in which every column of conns produced
// numbers (ok false leaves a round out): a paired difference within one
// round cancels drift that hits the columns of the round alike.
func (l *L7Results) perRound(conns int, f func(a, b, c L7Numbers) (float64, bool)) []float64 {
	var out []float64
	for r := range l.Rounds {
		var got [3]*L7Numbers
		for i, col := range L7Columns {
			p, _ := l.point(col, conns)
			for j := range p.Samples {
				if s := &p.Samples[j]; s.Round == r && s.NA == "" {
					got[i] = &s.L7Numbers
				}
			}
		}
		if got[0] == nil || got[1] == nil || got[2] == nil {
			continue
		}
		if v, ok := f(*got[0], *got[1], *got[2]); ok {
			out = append(out, v)
		}
	}
	return out
}

// valuesCell is the median of xs with their range; "—" for none.
func valuesCell(verb string, xs []float64) string {
	med, _, _, ok := medianRange(xs)
	if !ok {
		return "—"
	}
	return withRange(verb, med, xs)
}

func connsLabel(n int) string {
	if n == 1 {
		return "1 connection"
	}
	return fmt.Sprintf("%d connections", n)
}

// l7Latency picks one latency quantile of a sample.
type l7Latency struct {
	name string
	f    func(L7Numbers) float64
}

var l7Latencies = []l7Latency{{"p50", func(n L7Numbers) float64 { return n.P50us }}, {"p99", func(n L7Numbers) float64 { return n.P99us }}}

// l7Markdown renders the L7 table: one row per metric and number of
// connections, one column per path; then the goal per row.
func (r *Results) l7Markdown(b *strings.Builder) {
	l := r.L7
	fmt.Fprintf(b, "\n## L7: HTTP through the node-local Envoy (issue 9)\n\n")
	fmt.Fprintf(b, "- date: %s; %s\n", l.Date, l.Machine)
	fmt.Fprintf(b, "- %s; one private netns, everything on loopback: the client worker (cgroup app) asks `GET %s` of the pod %s (Go net/http, %d-byte answer)\n",
		orUnknown(l.Envoy), l7Path, l7Pod, len(l7Body))
	fmt.Fprintf(b, "- (a) direct: the client connects to the pod, no proxy. (b) bpf/sockmap rewrites the client's connect() to Envoy's listener %s, our getsockopt program answers SO_ORIGINAL_DST, sk_msg carries client <-> Envoy; Envoy -> pod is loopback TCP. (c) the same Envoy and configuration reached through iptables nat OUTPUT `REDIRECT` of the client's cgroup (an iptables sidecar's path; %s): SO_ORIGINAL_DST from conntrack, loopback TCP on both hops\n", l7Listen, orUnknown(l.Iptables))
	fmt.Fprintf(b, "- why REDIRECT is (c): the datapath's sockops puts both ends of a steered connection into the SOCKHASH, and a socket there runs tcp_bpf's paths even with no sk_msg program attached (not plain TCP, and the 6.18 read-wakeup regression path); steering without the SOCKHASH would need a datapath change. REDIRECT differs from (b) in both what the issue compares: how the connection reaches Envoy (NAT + conntrack on every packet vs a connect() rewrite) and how the bytes move (TCP vs sk_msg)\n")
	fmt.Fprintf(b, "- Envoy: one process, `--concurrency 1` (envoytest.Args), configured only by our xds.Server with xds.Build (listener original_dst + RBAC per destination chain, ORIGINAL_DST cluster, no access log); one L7Policy allows GET/HEAD under %s\n", l7Allowed)
	fmt.Fprintf(b, "- load: N keep-alive HTTP/1.1 connections, each a closed loop (the next request when the answer is read) for %s s after %d unmeasured requests per connection; latency = request write to answer read, p50/p99 over every request of the sample; a minimal client (raw request, status line and content-length parsed)\n",
		fmtSeconds(l.SampleSeconds), l7WarmRequests)
	fmt.Fprintf(b, "- rounds: %d per number of connections; a round measures every column in an order rotated per round (%s, then %s, ...); a sample is n/a unless its connections took its path (datapath and Envoy counters: (b) steered + sk_msg redirects + Envoy connections, (c) Envoy connections and nothing steered, (a) neither)\n",
		l.Rounds, strings.Join(rotation(L7Columns, 0), " "), strings.Join(rotation(L7Columns, 1), " "))
	fmt.Fprintf(b, "- cells: median over the rounds (min–max); added = the column minus (a) of the same round, median (min–max) over the rounds\n")
	fmt.Fprintf(b, "- policy change: from just before `xds.Server.Update` with a new Build to the server receiving Envoy's ACK of that version, and to the first request on a new connection (polled every 200µs through (b)) answered with the new verdict; changes alternate deny (403) and allow (200), every version new\n")
	fmt.Fprintf(b, "- Envoy RSS: VmRSS of its process, serving the configuration before any load, and after the last load round\n\n")
	if l.NA != "" && len(l.Points) == 0 {
		fmt.Fprintf(b, "%s\n", shortNA(l.NA))
		return
	}
	row := table(b, L7Columns, l7Title)
	for _, c := range l.Conns {
		pointRow := func(name string, f func(p L7Point) string) {
			row(fmt.Sprintf("%s, %s", name, connsLabel(c)), func(col string) string {
				p, ok := l.point(col, c)
				return cell(ok, p.NA, p.Rounds, len(p.Samples), func() string { return f(p) })
			})
		}
		pointRow("request p50 / p99 µs", func(p L7Point) string {
			return statCell(p.Samples, "%.0f", p.P50us, func(s L7Sample) float64 { return s.P50us }) + " / " +
				statCell(p.Samples, "%.0f", p.P99us, func(s L7Sample) float64 { return s.P99us })
		})
		pointRow("requests/s", func(p L7Point) string {
			return statCell(p.Samples, "%.0f", p.ReqPerSec, func(s L7Sample) float64 { return s.ReqPerSec })
		})
		row(fmt.Sprintf("added over (a), p50 / p99 µs, %s", connsLabel(c)), func(col string) string {
			if col == L7Direct {
				return "—"
			}
			i := slices.Index(L7Columns, col)
			var parts []string
			for _, q := range l7Latencies {
				parts = append(parts, valuesCell("%.0f", l.perRound(c, func(a, b, cc L7Numbers) (float64, bool) {
					return q.f([]L7Numbers{a, b, cc}[i]) - q.f(a), true
				})))
			}
			return strings.Join(parts, " / ")
		})
	}
	ch := l.Changes
	if ch.Changes > 0 || ch.NA != "" {
		changeRow := func(name string, f func() string) {
			row(fmt.Sprintf("%s (%d changes)", name, ch.Changes), func(col string) string {
				if col != L7Sockmap {
					return "—"
				}
				return cell(true, ch.NA, 0, 0, f)
			})
		}
		changeRow("L7Policy change to Envoy's ACK, p50 / p99 ms", func() string { return fmt.Sprintf("%.1f / %.1f", ch.AckP50ms, ch.AckP99ms) })
		changeRow("L7Policy change to new verdict on a new connection, p50 / p99 ms", func() string {
			return fmt.Sprintf("%.1f / %.1f", ch.EnforceP50ms, ch.EnforceP99ms)
		})
	}
	if l.RSSIdleKB > 0 {
		row("Envoy RSS idle / after the load", func(col string) string {
			switch col {
			case L7Sockmap:
				return fmt.Sprintf("%.1f / %.1f MB", float64(l.RSSIdleKB)/1024, float64(l.RSSLoadKB)/1024)
			case L7Redirect:
				return "(the same process)"
			}
			return "—"
		})
	}
	fmt.Fprintf(b, "\nGoal (issue 9): (b)'s added latency over (a) at least 30%% below (c)'s. Per round, 1 − added(b)/added(c); median (min–max) over the rounds:\n\n")
	for _, c := range l.Conns {
		var parts []string
		for _, q := range l7Latencies {
			cut := l.perRound(c, func(a, b, cc L7Numbers) (float64, bool) {
				ac := q.f(cc) - q.f(a)
				return 100 * (1 - (q.f(b)-q.f(a))/ac), ac > 0
			})
			med, _, _, ok := medianRange(cut)
			verdict := "no rounds to compare"
			if ok {
				verdict = "not met"
				if med >= 30 {
					verdict = "met"
				}
			}
			parts = append(parts, fmt.Sprintf("%s %s%% → %s", q.name, valuesCell("%.0f", cut), verdict))
		}
		fmt.Fprintf(b, "- %s: %s\n", connsLabel(c), strings.Join(parts, "; "))
	}
}
