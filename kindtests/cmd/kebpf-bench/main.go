//go:build linux

// Command kebpf-bench compares a direct connect, our socket LB and real
// kube-proxy (iptables and nftables) side by side, our NetworkPolicy
// datapath with iptables and ipset rules, and HTTP through Envoy steered by
// our sockmap datapath with direct and iptables REDIRECT; see `make bench`.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/bench"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

func main() {
	if bench.Child() {
		return
	}
	var (
		scales  = flag.String("scales", "10,1000,10000,100000", "numbers of Services to measure connect() at")
		rounds  = flag.Int("rounds", 3, "Services: rounds per scale, each starting and measuring every datapath once in a rotated order; cells are median (min–max)")
		modes   = flag.String("modes", strings.Join(append(bench.AllModes, bench.ModeTrace), ","), "datapaths: direct,socklb,iptables,nftables (Services), netpol (NetworkPolicy: none/eBPF/iptables/ipset), l7 (HTTP: direct/Envoy via sockmap/Envoy via REDIRECT), lbtrace (connect() with socket LB trace events on/off) and trace (policy events/s a node sustains with none lost)")
		tRates  = flag.String("trace-rates", "25000,50000,100000,200000", "trace: policy events per second, one row each")
		tDur    = flag.Duration("trace-duration", 3*time.Second, "trace: generation time per rate")
		tQueue  = flag.Int("trace-queue", 0, "trace: the client's queue in lines (default: the agent's --trace-queue default)")
		pScales = flag.String("policy-scales", "0,10,1000,10000", "netpol: numbers of CIDRs in the policy selecting the server pod")
		pConns  = flag.Int("policy-connects", 3000, "netpol: new TCP connections per sample")
		pRR     = flag.Duration("policy-rr", 1500*time.Millisecond, "netpol: UDP request/response time (established flow) per sample")
		pFlows  = flag.Duration("policy-flows", 0, "netpol: UDP new-flow time (fresh source port per request) per sample (default: --policy-rr)")
		pRounds = flag.Int("policy-rounds", 5, "netpol: rounds per scale, each measuring every datapath once in a rotated order; cells are median (min–max)")
		l7Conns = flag.String("l7-connections", "1,8", "l7: numbers of keep-alive HTTP connections")
		l7Dur   = flag.Duration("l7-duration", 3*time.Second, "l7: load time per sample")
		l7Round = flag.Int("l7-rounds", 6, "l7: rounds per number of connections, each measuring every column once in a rotated order (6: every column takes every slot twice); cells are median (min–max)")
		l7Chg   = flag.Int("l7-changes", 50, "l7: L7Policy changes timed (to Envoy's ACK and to the new verdict enforced)")
		ltRound = flag.Int("lbtrace-rounds", 10, "lbtrace: rounds, each measuring connect() with socket LB trace events on and off in a rotated order (--connects per sample); writes bench-lb-trace.md")
		ltPin   = flag.Bool("lbtrace-pin", false, "lbtrace: client and server on CPU 0, the reader on CPU 1 (isolates the kernel-side cost); writes bench-lb-trace-pinned.md")
		out     = flag.String("out", "results", "results directory")
		quick   = flag.Bool("quick", false, "fast smoke run at small N")
		bulk    = flag.Int("bulk", 20000, "Services created (x --bulk-endpoints) with the datapath running; 0 skips")
		bulkEps = flag.Int("bulk-endpoints", 5, "endpoints per bulk Service")
		changes = flag.Int("changes", 50, "EndpointSlice changes timed per datapath; 0 skips")
		count   = flag.Int("connects", 5000, "connects per latency sample")
		timeout = flag.Duration("mode-timeout", 10*time.Minute, "how long a datapath may take to program a scale point before it is n/a")
		binDir  = flag.String("kube-bin", "", "directory with kube-apiserver and kube-proxy (default: build or reuse the cached v1.35.4 ones)")
		etcd    = flag.String("etcd", "/usr/bin/etcd", "etcd binary")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	o := bench.Options{Out: *out, BulkServices: *bulk, BulkEndpoints: *bulkEps, Changes: *changes,
		LatCount: *count, Rounds: *rounds, ModeTimeout: *timeout, KubeBinDir: *binDir, Etcd: *etcd, Log: log,
		NetpolConns: *pConns, NetpolRR: *pRR, NetpolFlows: *pFlows, NetpolRounds: *pRounds,
		L7Duration: *l7Dur, L7Rounds: *l7Round, L7Changes: *l7Chg, LBTraceRounds: *ltRound, LBTracePin: *ltPin}
	if *pRounds < 1 || *rounds < 1 || *l7Round < 1 || *l7Chg < 1 || *ltRound < 1 {
		fmt.Fprintln(os.Stderr, "kebpf-bench: --rounds, --policy-rounds, --l7-rounds, --l7-changes and --lbtrace-rounds must be at least 1")
		os.Exit(2)
	}
	o.Scales = intList("scales", *scales, 1)
	o.PolicyScales = intList("policy-scales", *pScales, 0)
	o.L7Conns = intList("l7-connections", *l7Conns, 1)
	services, traceMode := false, false
	for _, m := range strings.Split(*modes, ",") {
		m = strings.TrimSpace(m)
		if m == bench.ModeTrace {
			traceMode = true
			continue
		}
		o.Modes = append(o.Modes, m)
		services = services || (m != bench.ModeNetpol && m != bench.ModeL7 && m != bench.ModeLBTrace)
	}
	if *quick {
		o.Scales = []int{10, 100}
		o.BulkServices, o.Changes, o.LatCount, o.ModeTimeout, o.Rounds = 200, 10, 1000, 2*time.Minute, 2
		o.PolicyScales, o.NetpolConns, o.NetpolRR, o.NetpolFlows, o.NetpolRounds = []int{0, 10}, 1000, 500*time.Millisecond, 500*time.Millisecond, 2
		o.L7Duration, o.L7Rounds, o.L7Changes = 500*time.Millisecond, 2, 5
		o.LBTraceRounds = 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "kebpf-bench: needs root (network namespaces, cgroups, BPF)")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// The NetworkPolicy and L7 benches need no control plane.
	if o.KubeBinDir == "" && services {
		// Builds kube-apiserver and kube-proxy once (about 10 min cold), then
		// reuses the cache the local cluster shares.
		dir, err := k8sbin.Ensure(ctx, os.Stderr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kebpf-bench: %v\n", err)
			os.Exit(1)
		}
		o.KubeBinDir = dir
	}
	failed := false
	if traceMode {
		// Its own file: it needs neither control plane nor the other tables.
		to := bench.TraceOptions{Rates: intList("trace-rates", *tRates, 1), Duration: *tDur, Out: *out, Queue: *tQueue, Log: log}
		if *quick {
			to.Rates, to.Duration = []int{25000, 100000}, time.Second
		}
		tr, err := bench.RunTrace(ctx, to)
		if tr != nil {
			fmt.Println(tr.Markdown())
			if *out != "" {
				fmt.Fprintf(os.Stderr, "results in %s/bench-trace.md, bench-trace.json\n", *out)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "kebpf-bench: trace: %v\n", err)
			failed = true
		}
	}
	if len(o.Modes) == 0 {
		if failed {
			os.Exit(1)
		}
		return
	}
	res, err := bench.Run(ctx, o)
	if res != nil && *out != "" {
		fmt.Println(res.Markdown())
		fmt.Fprintf(os.Stderr, "results in %s/bench.md, bench.json, connect-latency.png\n", *out)
	}
	if err != nil || failed {
		if err != nil {
			fmt.Fprintf(os.Stderr, "kebpf-bench: %v\n", err)
		}
		os.Exit(1)
	}
}

// intList parses the comma-separated numbers of flag name, each at least
// min; a bad entry is a usage error.
func intList(name, list string, min int) []int {
	var out []int
	for _, s := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < min {
			fmt.Fprintf(os.Stderr, "kebpf-bench: bad --%s entry %q\n", name, s)
			os.Exit(2)
		}
		out = append(out, n)
	}
	return out
}
