//go:build linux

package bench

import (
	"context"
	"errors"
	"fmt"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// The NetworkPolicy bench: a client pod netns and a server pod netns whose
// veths end in a node netns that routes between them, the way a CNI wires
// pods. The server pod is selected by an ingress policy allowing N CIDRs that
// do not contain the client plus, last, the client's /32 on the served ports,
// so every measured connection is allowed only after the whole rule set:
//
//	pc: eth0 10.126.0.2/30 <-> pn: kbpc<id> 10.126.0.1/30
//	ps: eth0 10.126.0.6/30 <-> pn: kbps<id> 10.126.0.5/30
//
// The policy is enforced in the node netns on the server's host-side veth,
// by our datapath (bpf/netpol, tcx) or by iptables/ipset rules in FORWARD,
// as an iptables-based engine (Calico, kube-router) writes them.
const (
	npClientIP   = "10.126.0.2"
	npClientGW   = "10.126.0.1"
	npServerIP   = "10.126.0.6"
	npServerGW   = "10.126.0.5"
	npTCPPort    = backendPort // answers and closes (runServer)
	npUDPPort    = 8081        // echo
	npDeniedPort = 8082        // no rule allows it: the enforcement check
	npChain      = "KEBPF-POD-SRV"
	npEndpointID = 1
	npPolicyID   = 1
)

// Policy datapaths, in table column order.
const (
	NetpolNone     = "none"
	NetpolEBPF     = "ebpf"
	NetpolIptables = "iptables"
	NetpolIpset    = "ipset"
)

// NetpolDatapaths is every policy column in order.
var NetpolDatapaths = []string{NetpolNone, NetpolEBPF, NetpolIptables, NetpolIpset}

var netpolTitle = map[string]string{
	NetpolNone: "no policy", NetpolEBPF: "eBPF (ours)", NetpolIptables: "iptables linear", NetpolIpset: "ipset",
}

// NetpolPoint is one policy datapath at N CIDRs: every number is the median
// over the rounds in Samples that produced numbers (a bench.json from before
// rounds has no Samples and one measurement per point).
type NetpolPoint struct {
	Datapath string `json:"datapath"`
	CIDRs    int    `json:"cidrs"`
	NetpolNumbers
	// Rounds is how many of Samples produced numbers.
	Rounds  int            `json:"rounds,omitempty"`
	Samples []NetpolSample `json:"samples,omitempty"`
}

// NetpolSample is one round of one datapath at one scale; Seconds is the
// wall time of program, checks, samples and teardown.
type NetpolSample struct {
	RoundSlot
	NetpolNumbers
}

// NetpolNumbers are what one measurement of a policy datapath yields.
type NetpolNumbers struct {
	// ProgramSeconds: writing the N+1 rules (ApplyEndpoint; iptables-restore
	// plus ipset restore) until the client's first connection is answered.
	ProgramSeconds float64 `json:"programSeconds,omitempty"`
	// Connections: each a new TCP connection the server answers and closes.
	ConnPerSec float64 `json:"connPerSec,omitempty"`
	ConnP50us  float64 `json:"connP50us,omitempty"`
	ConnP99us  float64 `json:"connP99us,omitempty"`
	// UDP request/response on one connected socket (an established flow):
	// every round trip is two packets through the node and the policy.
	RRPerSec float64 `json:"udpRRPerSec,omitempty"`
	RRus     float64 `json:"udpRRus,omitempty"`
	// UDP request/response, each from a fresh source port: a new flow (new
	// conntrack entry, full rule walk or LPM lookup) per round trip.
	FlowsPerSec float64 `json:"udpNewFlowsPerSec,omitempty"`
	FlowUs      float64 `json:"udpNewFlowUs,omitempty"`
	Errors      int     `json:"errors,omitempty"`
	NA          string  `json:"na,omitempty"`
}

// NetpolPoint looks up one policy measurement.
func (r *Results) NetpolPoint(dp string, n int) (NetpolPoint, bool) {
	return find(r.Netpol, func(p NetpolPoint) bool { return p.Datapath == dp && p.CIDRs == n })
}

type npEnv struct {
	*env
	pc, ps, pn string // client pod, server pod, node netns
	hostVeth   string // server's host-side veth in pn
	ifServer   int
	set        string // ipset name
	objs       *netpol.Objects
	worker     *proc
	conns      int           // connections per sample
	rr         time.Duration // UDP request/response time per sample
	flows      time.Duration // UDP new-flow time per sample
	rounds     int
	// rules are the inputs of program at scale rulesN, built once per scale.
	rulesN int
	rules  map[string]string // datapath -> iptables-restore input
	ipset  string
	policy netpol.EndpointPolicy
}

// newNetpolEnv builds the three netns, the veths, a private bpffs and starts
// the server and the client worker. On error everything made so far is
// already removed.
func newNetpolEnv(ctx context.Context, o Options) (_ *npEnv, err error) {
	base, err := newRunEnv(ctx, o.Log, "-pn", "-pc", "-ps")
	if err != nil {
		return nil, err
	}
	id := base.id
	e := &npEnv{env: base, pc: base.netns("-pc"), ps: base.netns("-ps"), pn: base.netns("-pn"), hostVeth: "kbps" + id, set: "kebpf-np-" + id,
		conns: o.NetpolConns, rr: o.NetpolRR, flows: o.NetpolFlows, rounds: o.NetpolRounds, rulesN: -1}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	cv := "kbpc" + id
	steps := [][]string{
		{"-n", e.pn, "link", "add", cv, "type", "veth", "peer", "name", "eth0", "netns", e.pc},
		{"-n", e.pn, "link", "add", e.hostVeth, "type", "veth", "peer", "name", "eth0", "netns", e.ps},
		{"-n", e.pn, "addr", "add", npClientGW + "/30", "dev", cv},
		{"-n", e.pn, "addr", "add", npServerGW + "/30", "dev", e.hostVeth},
		{"-n", e.pn, "link", "set", cv, "up"},
		{"-n", e.pn, "link", "set", e.hostVeth, "up"},
		{"-n", e.pn, "link", "set", "lo", "up"},
		{"-n", e.pc, "addr", "add", npClientIP + "/30", "dev", "eth0"},
		{"-n", e.ps, "addr", "add", npServerIP + "/30", "dev", "eth0"},
		{"-n", e.pc, "link", "set", "eth0", "up"},
		{"-n", e.ps, "link", "set", "eth0", "up"},
		{"-n", e.pc, "link", "set", "lo", "up"},
		{"-n", e.ps, "link", "set", "lo", "up"},
		{"-n", e.pc, "route", "add", "default", "via", npClientGW},
		{"-n", e.ps, "route", "add", "default", "via", npServerGW},
	}
	for _, s := range steps {
		if err := run(ctx, "ip", s...); err != nil {
			return nil, err
		}
	}
	// Between samples the node's conntrack table is flushed, so a new-flow
	// sample never finds an entry a previous one left.
	if _, err := exec.LookPath("conntrack"); err != nil {
		return nil, fmt.Errorf("conntrack (conntrack-tools) is needed to flush the node netns between samples: %w", err)
	}
	if err := run(ctx, "ip", "netns", "exec", e.pn, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		return nil, err
	}
	if err := inNetns(e.pn, func() error {
		ifi, err := net.InterfaceByName(e.hostVeth)
		if err != nil {
			return err
		}
		e.ifServer = ifi.Index
		return nil
	}); err != nil {
		return nil, fmt.Errorf("find %s: %w", e.hostVeth, err)
	}

	if err := e.mountBPFFS(); err != nil {
		return nil, err
	}
	// Sized for the largest scale: an apply holds old and new entries at once.
	maxN := 0
	for _, n := range o.PolicyScales {
		maxN = max(maxN, n)
	}
	objs, err := netpol.Load(filepath.Join(e.bpffs, "kubectl-ebpf"), netpol.LoadOptions{
		MaxEndpoints: 16, MaxPolicyEntries: max(netpol.DefaultMaxPolicyEntries, 2*maxN+16), Logger: o.Log})
	if err != nil {
		return nil, err
	}
	e.objs = objs
	// Runs before the unmount (undo is reversed): links, pins and maps go.
	e.undo = append(e.undo, func() error {
		if err := objs.Detach(); err != nil {
			return fmt.Errorf("detach netpol: %w", err)
		}
		return nil
	})
	// The netns go with their iptables rules; ipsets of a netns are
	// destroyed with it, but say so explicitly in case a set is in use.
	e.undo = append(e.undo, func() error { return e.unprogram(context.Background()) })

	if _, err := e.start("np-server", startOpts{netns: e.ps, env: []string{childEnv + "=npserver"}}, e.self, e.marker()); err != nil {
		return nil, err
	}
	if e.worker, err = e.start("np-worker", startOpts{netns: e.pc, stdin: true, env: []string{childEnv + "=worker"}}, e.self, e.marker()); err != nil {
		return nil, err
	}
	o.Log.Info("netpol bench environment ready", "id", id, "clientNetns", e.pc, "serverNetns", e.ps, "nodeNetns", e.pn)
	return e, nil
}

// inNetns runs fn on a thread inside netns name; tcx attachments by ifindex
// and sockets made there belong to that netns.
func inNetns(name string, fn func() error) error { return netnsutil.Do(netnsutil.Path(name), fn) }

// cidr is the i-th non-client rule peer: /32s from the benchmarking range
// 198.18.0.0/15 (RFC 2544), far from 10.126.0.0/24.
func cidr(i int) netip.Prefix {
	a := netip.AddrFrom4([4]byte{198, 18 + byte(i>>16&1), byte(i >> 8), byte(i)})
	return netip.PrefixFrom(a, 32)
}

func (e *npEnv) endpointPolicy(n int) netpol.EndpointPolicy {
	p := netpol.EndpointPolicy{ID: npEndpointID, IfIndex: e.ifServer, IPs: []netip.Addr{netip.MustParseAddr(npServerIP)},
		IngressEnforced: true, DefaultDenyPolicy: npPolicyID}
	for i := 0; i < n; i++ {
		p.Ingress = append(p.Ingress, netpol.PeerEntry{Prefix: cidr(i),
			Rules: []netpol.PortRule{{Proto: netpol.AnyProto, PolicyID: npPolicyID, Rule: uint16(i % 60000)}}})
	}
	p.Ingress = append(p.Ingress, netpol.PeerEntry{Prefix: netip.MustParsePrefix(npClientIP + "/32"), Rules: []netpol.PortRule{
		{Proto: netpol.TCP, PortLo: npTCPPort, PortHi: npTCPPort, PolicyID: npPolicyID, Rule: uint16(n % 60000)},
		{Proto: netpol.UDP, PortLo: npUDPPort, PortHi: npUDPPort, PolicyID: npPolicyID, Rule: uint16(n % 60000)},
	}})
	return p
}

// iptablesRules is the per-pod chain an iptables-based engine writes: a
// FORWARD jump for traffic leaving towards the pod's veth, conntrack
// established/related first, the peers (one rule each, or one ipset match),
// the client rule on the served ports, then drop.
func (e *npEnv) iptablesRules(dp string, n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "*filter\n:FORWARD ACCEPT [0:0]\n:%s - [0:0]\n", npChain)
	fmt.Fprintf(&b, "-A FORWARD -o %s -d %s/32 -j %s\n", e.hostVeth, npServerIP, npChain)
	fmt.Fprintf(&b, "-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n", npChain)
	if dp == NetpolIpset {
		fmt.Fprintf(&b, "-A %s -m set --match-set %s src -j ACCEPT\n", npChain, e.set)
	} else {
		for i := 0; i < n; i++ {
			fmt.Fprintf(&b, "-A %s -s %s -j ACCEPT\n", npChain, cidr(i))
		}
	}
	fmt.Fprintf(&b, "-A %s -s %s/32 -p tcp -m tcp --dport %d -j ACCEPT\n", npChain, npClientIP, npTCPPort)
	fmt.Fprintf(&b, "-A %s -s %s/32 -p udp -m udp --dport %d -j ACCEPT\n", npChain, npClientIP, npUDPPort)
	fmt.Fprintf(&b, "-A %s -j DROP\nCOMMIT\n", npChain)
	return b.String()
}

func (e *npEnv) ipsetRestore(n int) string {
	var b strings.Builder
	// A set still held by a rule being freed is flushed and reused.
	fmt.Fprintf(&b, "create %s hash:net family inet hashsize 1024 maxelem %d\nflush %s\n", e.set, max(1<<18, n), e.set)
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "add %s %s\n", e.set, cidr(i))
	}
	return b.String()
}

func (e *npEnv) execIn(ctx context.Context, stdin, name string, args ...string) error {
	path := filepath.Join(e.dir, fmt.Sprintf("%s-%d.in", name, time.Now().UnixNano()))
	if err := os.WriteFile(path, []byte(stdin), 0o600); err != nil {
		return err
	}
	defer os.Remove(path)
	return run(ctx, "sh", "-c", fmt.Sprintf(`exec ip netns exec %s %s %s < %s`, e.pn, name, strings.Join(args, " "), path))
}

// prepare builds the rule sets of every datapath at n CIDRs once: the
// rounds then only write them.
func (e *npEnv) prepare(n int) {
	if e.rulesN == n {
		return
	}
	e.rulesN, e.policy, e.ipset = n, e.endpointPolicy(n), e.ipsetRestore(n)
	e.rules = map[string]string{
		NetpolIptables: e.iptablesRules(NetpolIptables, n),
		NetpolIpset:    e.iptablesRules(NetpolIpset, n),
	}
}

// program enforces the policy with dp at n CIDRs.
func (e *npEnv) program(ctx context.Context, dp string, n int) error {
	e.prepare(n)
	switch dp {
	case NetpolNone:
		return nil
	case NetpolEBPF:
		p := e.policy
		return inNetns(e.pn, func() error { return e.objs.ApplyEndpoint(p) })
	case NetpolIpset:
		if err := e.execIn(ctx, e.ipset, "ipset", "-exist", "restore"); err != nil {
			return err
		}
		fallthrough
	case NetpolIptables:
		return e.execIn(ctx, e.rules[dp], "iptables-restore", "-w")
	}
	return fmt.Errorf("unknown policy datapath %q", dp)
}

// unprogram removes every policy datapath from the node netns: the next
// column starts from the bare floor.
func (e *npEnv) unprogram(ctx context.Context) error {
	var errs []error
	if e.objs != nil {
		if err := e.objs.DeleteEndpoint(npEndpointID); err != nil {
			errs = append(errs, err)
		}
	}
	// The netns is ours alone: its whole ruleset is what we wrote
	// (iptables-restore here writes through nf_tables).
	if err := run(ctx, "ip", "netns", "exec", e.pn, "nft", "flush", "ruleset"); err != nil {
		errs = append(errs, err)
	}
	_ = run(ctx, "ip", "netns", "exec", e.pn, "ipset", "destroy", e.set)
	// Flows the rules tracked outlive the rules; the next sample must start
	// with none (the eBPF flow table is purged by DeleteEndpoint).
	if err := run(ctx, "ip", "netns", "exec", e.pn, "conntrack", "-F"); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// enforced reports whether a port no rule allows is dropped: a datapath
// that lets it through would make its numbers meaningless. Without policy
// the server's kernel refuses the connection at once.
func (e *npEnv) enforced() (bool, error) {
	var derr error
	err := inNetns(e.pc, func() error {
		c, err := net.DialTimeout("tcp4", fmt.Sprintf("%s:%d", npServerIP, npDeniedPort), 300*time.Millisecond)
		if c != nil {
			c.Close()
		}
		derr = err
		return nil
	})
	if err != nil {
		return false, err
	}
	var ne net.Error
	if errors.As(derr, &ne) && ne.Timeout() {
		return true, nil
	}
	return false, nil
}

// runNetpol measures every policy datapath at every scale in one run: per
// scale, o.NetpolRounds rounds, each measuring every datapath once in an
// order rotated per round (none ebpf iptables ipset, then ebpf iptables
// ipset none, ...), so drift of a noisy machine hits every column alike.
func runNetpol(ctx context.Context, o Options, res *Results) error {
	res.PolicyScales, res.Netpol = o.PolicyScales, nil
	res.NetpolDate = time.Now().UTC().Format(time.RFC3339)
	res.NetpolConns, res.NetpolRRSeconds = o.NetpolConns, o.NetpolRR.Seconds()
	res.NetpolFlowsSeconds, res.NetpolRounds = o.NetpolFlows.Seconds(), o.NetpolRounds
	e, err := newNetpolEnv(ctx, o)
	if err != nil {
		return err
	}
	return runIn(ctx, o, res, e.env, e.close, []string{"np-worker"}, func() error { return e.measure(ctx, o, res) })
}

// measure is runNetpol's rounds in the built environment.
func (e *npEnv) measure(ctx context.Context, o Options, res *Results) error {
	srv := fmt.Sprintf("%s:%d", npServerIP, npTCPPort)
	if _, err := e.worker.call(workerReq{Op: "wait", Addr: srv, TimeoutMs: 10000}); err != nil {
		return fmt.Errorf("server unreachable before any policy: %w: %s", err, e.logTail("np-server"))
	}
	total := len(o.PolicyScales) * len(NetpolDatapaths) * e.rounds
	k, start := 0, time.Now()
	for _, n := range o.PolicyScales {
		byDP, err := measureRounds(e.rounds, NetpolDatapaths, func(r, slot int, dp string) (NetpolSample, error) {
			if slot == 0 {
				o.Log.Info("netpol round", "cidrs", n, "round", fmt.Sprintf("%d/%d", r+1, e.rounds), "order", strings.Join(rotation(NetpolDatapaths, r), ","))
			}
			t := time.Now()
			s := e.sample(ctx, dp, n)
			if ctx.Err() != nil {
				return s, ctx.Err()
			}
			s.Round, s.Slot, s.Seconds = r, slot, time.Since(t).Seconds()
			k++
			o.Log.Info("netpol sample", "progress", fmt.Sprintf("%d/%d", k, total), "elapsed", time.Since(start).Round(time.Second),
				"cidrs", n, "round", r+1, "datapath", dp, "connPerSec", int(s.ConnPerSec), "connP50us", s.ConnP50us,
				"udpRRPerSec", int(s.RRPerSec), "udpNewFlowsPerSec", int(s.FlowsPerSec),
				"programSeconds", s.ProgramSeconds, "seconds", fmt.Sprintf("%.1f", s.Seconds), "na", s.NA)
			return s, nil
		})
		if err != nil {
			return err
		}
		for _, dp := range NetpolDatapaths {
			p := aggregateNetpol(dp, n, byDP[dp])
			res.Netpol = append(res.Netpol, p)
			o.Log.Info("netpol point (median over rounds)", "datapath", dp, "cidrs", n, "rounds", fmt.Sprintf("%d/%d", p.Rounds, len(p.Samples)),
				"connPerSec", int(p.ConnPerSec), "udpRRPerSec", int(p.RRPerSec), "udpNewFlowsPerSec", int(p.FlowsPerSec),
				"programSeconds", p.ProgramSeconds, "na", p.NA)
		}
		res.write(o.Out, o.Log)
	}
	return nil
}

// sample programs dp at n CIDRs, checks it enforces (the denied port times
// out, the client is answered), measures connections, the established UDP
// flow and UDP new flows, and removes the rules again: every sample starts
// from the bare node netns with an empty conntrack table.
func (e *npEnv) sample(ctx context.Context, dp string, n int) NetpolSample {
	var s NetpolSample
	defer func() {
		if err := e.unprogram(context.Background()); err != nil && s.NA == "" {
			s.NA = "teardown: " + err.Error()
		}
	}()
	srv := fmt.Sprintf("%s:%d", npServerIP, npTCPPort)
	udp := fmt.Sprintf("%s:%d", npServerIP, npUDPPort)
	e.prepare(n)
	t := time.Now()
	if err := e.program(ctx, dp, n); err != nil {
		s.NA = err.Error()
		return s
	}
	if _, err := e.worker.call(workerReq{Op: "wait", Addr: srv, TimeoutMs: 10000}); err != nil {
		s.NA = "client not allowed: " + err.Error()
		return s
	}
	if dp != NetpolNone {
		s.ProgramSeconds = time.Since(t).Seconds()
		ok, err := e.enforced()
		if err != nil {
			s.NA = err.Error()
			return s
		}
		if !ok {
			s.NA = fmt.Sprintf("not enforced: port %d reached the server", npDeniedPort)
			return s
		}
	}
	// step runs one worker request; one that failed without numbers makes
	// the sample n/a, named by what.
	step := func(what string, req workerReq, numbers func(workerResp) float64) (workerResp, bool) {
		resp, err := e.worker.call(req)
		if err != nil && numbers(resp) == 0 {
			s.NA = what + ": " + err.Error()
			return resp, false
		}
		s.Errors += resp.Errors
		return resp, true
	}
	rate := func(r workerResp) float64 { return r.RRPerSec }
	resp, ok := step("connections", workerReq{Op: "conns", Addr: srv, Count: e.conns}, func(r workerResp) float64 { return r.ConnPerSec })
	if !ok {
		return s
	}
	s.ConnPerSec, s.ConnP50us, s.ConnP99us = resp.ConnPerSec, resp.P50us, resp.P99us
	if resp, ok = step("udp rr", workerReq{Op: "udprr", Addr: udp, TimeoutMs: int(e.rr / time.Millisecond)}, rate); !ok {
		return s
	}
	s.RRPerSec, s.RRus = resp.RRPerSec, resp.RRus
	if resp, ok = step("udp new flows", workerReq{Op: "udpflows", Addr: udp, TimeoutMs: int(e.flows / time.Millisecond)}, rate); !ok {
		return s
	}
	s.FlowsPerSec, s.FlowUs = resp.RRPerSec, resp.RRus
	return s
}

// runNPServer is the server pod: TCP on npTCPPort answers and closes
// (runServer), UDP on npUDPPort echoes.
func runNPServer() error {
	u, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", npUDPPort))
	if err != nil {
		return err
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := u.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = u.WriteTo(buf[:n], from)
		}
	}()
	return runServer()
}

// connsOp opens req.Count new TCP connections one after another; each is
// answered (one line) and closed by the server.
func connsOp(req workerReq) workerResp {
	return connectSeries(req, 100, true)
}

// udpRROp sends 64-byte requests on one connected UDP socket and waits for
// each echo, for req.TimeoutMs: the round-trip rate of an established flow.
func udpRROp(req workerReq) workerResp {
	sa, err := sockaddr(req.Addr)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1}); err != nil {
		return workerResp{Err: err.Error()}
	}
	if err := unix.Connect(fd, sa); err != nil {
		return workerResp{Err: err.Error()}
	}
	msg := make([]byte, 64)
	buf := make([]byte, 2048)
	once := func() error {
		if _, err := unix.Write(fd, msg); err != nil {
			return err
		}
		_, err := readRetry(fd, buf)
		return err
	}
	for i := 0; i < 1000; i++ {
		_ = once()
	}
	var n, errs int
	var firstErr error
	d := time.Duration(req.TimeoutMs) * time.Millisecond
	start := time.Now()
	for time.Since(start) < d {
		if err := once(); err != nil {
			errs++
			firstErr = err
			continue
		}
		n++
	}
	return rateResp(n, errs, firstErr, time.Since(start))
}

// Source ports of the new-flow sample: every request comes from the next
// one, so no 5-tuple repeats within a sample (nor the warm-up's), and the
// node's conntrack tables are flushed between samples.
const (
	npFlowPortLo = 10000
	npFlowPortHi = 65535
	npFlowWarmup = 200
)

// udpFlowsOp sends 64-byte requests for req.TimeoutMs, each from a new
// socket bound to a source port not used before in this sample, and waits
// for each echo: every round trip is a new flow through the node (a new
// conntrack entry, the policy's rule walk or LPM lookup). It stops early
// when the ports run out.
func udpFlowsOp(req workerReq) workerResp {
	sa, err := sockaddr(req.Addr)
	if err != nil {
		return workerResp{Err: err.Error()}
	}
	msg := make([]byte, 64)
	buf := make([]byte, 2048)
	port := npFlowPortLo
	// once returns false, nil for a port already taken: skipped, not an error.
	once := func() (bool, error) {
		p := port
		port++
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return false, err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1}); err != nil {
			return false, err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: p}); err != nil {
			if errors.Is(err, unix.EADDRINUSE) {
				return false, nil
			}
			return false, err
		}
		if err := unix.Connect(fd, sa); err != nil {
			return false, err
		}
		if _, err := unix.Write(fd, msg); err != nil {
			return false, err
		}
		if _, err := readRetry(fd, buf); err != nil {
			return false, err
		}
		return true, nil
	}
	for i := 0; i < npFlowWarmup && port <= npFlowPortHi; i++ {
		_, _ = once()
	}
	var n, errs int
	var firstErr error
	d := time.Duration(req.TimeoutMs) * time.Millisecond
	start := time.Now()
	for time.Since(start) < d && port <= npFlowPortHi {
		ok, err := once()
		switch {
		case err != nil:
			errs++
			firstErr = err
		case ok:
			n++
		}
	}
	return rateResp(n, errs, firstErr, time.Since(start))
}

// netpolMarkdown renders the policy table: one row per metric and scale,
// one column per policy datapath; a cell is the median over the rounds with
// their min–max range.
func (r *Results) netpolMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "\n## NetworkPolicy: connections, an established flow and new flows through a policed pod\n\n")
	fmt.Fprintf(b, "- date: %s; client pod netns -> node netns (routing, where the policy is enforced on the server's host-side veth) -> server pod netns\n", r.NetpolDate)
	fmt.Fprintf(b, "- policy: ingress on the server pod allowing N /32s (198.18.0.0/15, never the client), then the client's /32 on the served ports last: every measured packet is allowed only after the whole rule set\n")
	fmt.Fprintf(b, "- eBPF (ours): bpf/netpol tcx on the veth, N+1 LPM entries, conntrack; iptables linear: FORWARD -o veth -> per-pod chain, ctstate ESTABLISHED,RELATED accept, N `-s CIDR -j ACCEPT`, client rule, DROP (iptables-nft); ipset: same chain with one `-m set --match-set` hash:net of N entries\n")
	if r.NetpolRounds > 0 {
		fmt.Fprintf(b, "- rounds: %d per scale; a round programs, checks (the denied port %d must time out, the client must be answered), measures and removes every datapath in turn, in an order rotated per round (%s, then %s, ...), so drift of the machine hits every column alike; the node netns conntrack table is flushed after every sample\n",
			r.NetpolRounds, npDeniedPort, strings.Join(rotation(NetpolDatapaths, 0), " "), strings.Join(rotation(NetpolDatapaths, 1), " "))
		fmt.Fprintf(b, "- cells: median over the rounds (min–max in parentheses); [k/R rounds] marks a cell where only k rounds produced numbers\n")
	}
	fmt.Fprintf(b, "- connections/s: %d new TCP connections per sample, one after another from one client, the server answers one line and closes; p50/p99 is connect to answer\n", r.NetpolConns)
	fmt.Fprintf(b, "- established flow: UDP request/response (64 B) on one connected socket for %s s: 2 packets through the node per round trip, after the first both engines only hit conntrack\n", fmtSeconds(r.NetpolRRSeconds))
	if r.NetpolFlowsSeconds > 0 {
		fmt.Fprintf(b, "- new flows: UDP request/response (64 B) for %s s, each from a new socket bound to a source port not used before in the sample: a new conntrack entry per round trip, so iptables walks its N rules (ipset: one hash lookup) and eBPF does its LPM lookup once per flow\n", fmtSeconds(r.NetpolFlowsSeconds))
	}
	fmt.Fprintf(b, "- program time: writing the prepared rule set (ApplyEndpoint; ipset restore + iptables-restore) until the client's first connection is answered\n\n")
	tableRow := table(b, NetpolDatapaths, netpolTitle)
	row := func(name string, n int, f func(p NetpolPoint) string) {
		tableRow(name, func(dp string) string {
			p, ok := r.NetpolPoint(dp, n)
			return cell(ok, p.NA, p.Rounds, len(p.Samples), func() string { return f(p) })
		})
	}
	// Points from before rounds existed carry one sample of higher
	// precision; keep their old formatting.
	us := "%.0f"
	if r.NetpolRounds == 0 {
		us = "%.1f"
	}
	for _, n := range r.PolicyScales {
		row(fmt.Sprintf("connections/s, %s CIDRs", human(n)), n, func(p NetpolPoint) string {
			return statCell(p.Samples, "%.0f", p.ConnPerSec, func(s NetpolSample) float64 { return s.ConnPerSec })
		})
		row(fmt.Sprintf("connection p50 / p99 µs, %s CIDRs", human(n)), n, func(p NetpolPoint) string {
			return statCell(p.Samples, us, p.ConnP50us, func(s NetpolSample) float64 { return s.ConnP50us }) + " / " +
				statCell(p.Samples, us, p.ConnP99us, func(s NetpolSample) float64 { return s.ConnP99us })
		})
		row(fmt.Sprintf("UDP round trips/s, established flow, %s CIDRs", human(n)), n, func(p NetpolPoint) string {
			return statCell(p.Samples, "%.0f", p.RRPerSec, func(s NetpolSample) float64 { return s.RRPerSec })
		})
		if r.NetpolFlowsSeconds > 0 {
			row(fmt.Sprintf("UDP new flows/s (fresh source port each), %s CIDRs", human(n)), n, func(p NetpolPoint) string {
				return statCell(p.Samples, "%.0f", p.FlowsPerSec, func(s NetpolSample) float64 { return s.FlowsPerSec })
			})
		}
		row(fmt.Sprintf("program time to first allowed connection, %s CIDRs", human(n)), n, func(p NetpolPoint) string {
			if p.Datapath == NetpolNone {
				return "—"
			}
			return statCell(p.Samples, "%.3f", p.ProgramSeconds, func(s NetpolSample) float64 { return s.ProgramSeconds }) + " s"
		})
	}
}

// fmtSeconds prints a sample duration without trailing zeros: 3, 1.5, 0.2.
func fmtSeconds(s float64) string {
	return strconv.FormatFloat(s, 'f', -1, 64)
}

// readRetry repeats a read the Go runtime's preemption signal interrupted:
// with SO_RCVTIMEO set the kernel does not restart it (signal(7)).
func readRetry(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(fd, buf)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// rateResp is a request/response sample: n answered in wall, errs failed.
func rateResp(n, errs int, firstErr error, wall time.Duration) workerResp {
	resp := workerResp{Errors: errs, OK: n > 0}
	if errs > 0 {
		resp.Err = firstErr.Error()
	}
	if n > 0 {
		resp.RRPerSec = float64(n) / wall.Seconds()
		resp.RRus = wall.Seconds() * 1e6 / float64(n)
	}
	return resp
}
