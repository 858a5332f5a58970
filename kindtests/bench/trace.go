//go:build linux

package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/trace"
)

// ModeTrace is the policy-event rate bench (this file): new denied flows
// pushed through the real kebpf_np_to program at controlled rates, read by
// the agent's PolicyReader into its Hub and drained by one following
// client; delivered and lost per rate, and the reading process's CPU.
const ModeTrace = "trace"

// TraceOptions configure the trace bench.
type TraceOptions struct {
	Rates    []int         // events per second, one row each
	Duration time.Duration // generation time per rate
	Out      string        // results dir; "" writes nothing
	// Queue is the client's queue (--trace-queue of the agent); 0: the
	// agent's default.
	Queue int
	Log   *slog.Logger
}

// TraceRow is one rate's measurement.
type TraceRow struct {
	Target    int     `json:"target"`    // events/s asked of the generator
	Sent      uint64  `json:"sent"`      // new denied flows the program judged
	Achieved  float64 `json:"achieved"`  // sent / generation time
	Delivered uint64  `json:"delivered"` // events the client received
	LostKern  uint64  `json:"lostKernel"`
	LostSlow  uint64  `json:"lostSlowClient"`
	// CPU is the reading process's CPU time (user+system, getrusage
	// RUSAGE_SELF) from the start of generation until every event was
	// delivered or announced, over the generation time: cores used.
	CPU float64 `json:"cpuCores"`
}

// TraceResults are the trace bench's rows.
type TraceResults struct {
	Date     time.Time     `json:"date"`
	Kernel   string        `json:"kernel"`
	CPUs     int           `json:"cpus"`
	Duration time.Duration `json:"duration"`
	RingSize int           `json:"ringBytes"`
	Queue    int           `json:"queue"`
	// LoadAvg is /proc/loadavg at the start: the machine is shared, and
	// the reader competes with whatever else runs.
	LoadAvg string     `json:"loadavg"`
	Rows    []TraceRow `json:"rows"`
}

const (
	tracePod   = "10.127.0.2"
	traceAllow = 100_000 // the goal: this rate with none lost
)

// RunTrace measures each rate in o.Rates once, in order.
func RunTrace(ctx context.Context, o TraceOptions) (*TraceResults, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	e, err := newRunEnv(ctx, o.Log, "-tr")
	if err != nil {
		return nil, err
	}
	defer e.close()
	ns := e.netns("-tr")
	if err := e.mountBPFFS(); err != nil {
		return nil, err
	}
	pinDir := filepath.Join(e.bpffs, "kubectl-ebpf")
	// BPF_PROG_TEST_RUN hands the program an skb on the caller's loopback
	// (ifindex 1): the endpoint is lo of a private netns, where attaching
	// to it harms nothing. Default map sizes: what the agent runs with.
	var objs *netpol.Objects
	if err := inNetns(ns, func() error {
		var err error
		if objs, err = netpol.Load(pinDir, netpol.LoadOptions{Logger: o.Log}); err != nil {
			return err
		}
		return objs.ApplyEndpoint(netpol.EndpointPolicy{ID: 2, IfIndex: 1, IPs: []netip.Addr{netip.MustParseAddr(tracePod)},
			IngressEnforced: true, DefaultDenyPolicy: 7})
	}); err != nil {
		return nil, err
	}
	e.undo = append(e.undo, func() error { return inNetns(ns, objs.Detach) })

	if o.Queue <= 0 {
		o.Queue = trace.DefaultQueueSize
	}
	hub, err := trace.NewHub(trace.Options{Node: "bench", QueueSize: o.Queue})
	if err != nil {
		return nil, err
	}
	sub := hub.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	readerDone := make(chan error, 1)
	r := &trace.PolicyReader{Events: objs.EventsMap(), Lost: objs.EventsLost, LostEvery: 100 * time.Millisecond, Hub: hub,
		Node: "bench", Namer: noNames{}, Log: o.Log}
	go func() { readerDone <- r.Run(rctx) }()
	defer func() { cancel(); <-readerDone }()

	// The client: drains its queue and encodes each line as the /trace
	// handler does, into io.Discard.
	var delivered, lostKern, lostSlow atomic.Uint64
	go func() {
		enc := json.NewEncoder(io.Discard)
		for {
			l, ok := sub.Next(rctx)
			if !ok {
				return
			}
			enc.Encode(l)
			switch {
			case l.Event != nil:
				delivered.Add(1)
			case l.Lost.Reason == apiv1.TraceLostKernel:
				lostKern.Add(l.Lost.Count)
			case l.Lost.Reason == apiv1.TraceLostSlowClient:
				lostSlow.Add(l.Lost.Count)
			}
		}
	}()

	// The generator is another process (it loads the same pinned maps and
	// its own copy of the programs), so this process's rusage is the
	// reader, hub and client alone.
	gen, err := e.start("trace-gen", startOpts{netns: ns, stdin: true,
		env: []string{childEnv + "=tracegen", "KEBPF_BENCH_PIN_DIR=" + pinDir}}, e.self, e.marker())
	if err != nil {
		return nil, err
	}
	res := &TraceResults{Date: time.Now().UTC(), Kernel: kernelRelease(), CPUs: numCPU(), Duration: o.Duration,
		RingSize: netpol.DefaultEventsBytes, Queue: o.Queue, LoadAvg: loadAvg()}
	base := 1
	for _, rate := range o.Rates {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		d0, k0, s0 := delivered.Load(), lostKern.Load(), lostSlow.Load()
		ru0 := rusage()
		if _, err := fmt.Fprintf(gen.in, "%d %d %d\n", rate, o.Duration.Nanoseconds(), base); err != nil {
			return res, fmt.Errorf("trace generator: %w", err)
		}
		line, err := gen.out.ReadString('\n')
		if err != nil {
			return res, fmt.Errorf("trace generator: %w (see its log in %s)", err, e.dir)
		}
		var sent uint64
		var took int64
		if _, err := fmt.Sscan(line, &sent, &took); err != nil {
			return res, fmt.Errorf("trace generator said %q: %w", line, err)
		}
		base += int(sent) + 1
		// Every event delivered or announced (the kernel's count is read
		// every 100ms), or 10s.
		deadline := time.Now().Add(10 * time.Second)
		for delivered.Load()-d0+lostKern.Load()-k0+lostSlow.Load()-s0 < sent && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		ru1 := rusage()
		row := TraceRow{Target: rate, Sent: sent, Achieved: float64(sent) / time.Duration(took).Seconds(),
			Delivered: delivered.Load() - d0, LostKern: lostKern.Load() - k0, LostSlow: lostSlow.Load() - s0,
			CPU: (ru1 - ru0).Seconds() / time.Duration(took).Seconds()}
		if row.Delivered+row.LostKern+row.LostSlow != sent {
			o.Log.Warn("trace bench: events unaccounted for after 10s", "rate", rate, "sent", sent, "delivered", row.Delivered,
				"lostKernel", row.LostKern, "lostSlowClient", row.LostSlow)
		}
		o.Log.Info("trace bench", "target", rate, "achieved", int(row.Achieved), "sent", sent, "delivered", row.Delivered,
			"lostKernel", row.LostKern, "lostSlowClient", row.LostSlow, "cpuCores", fmt.Sprintf("%.2f", row.CPU))
		res.Rows = append(res.Rows, row)
		time.Sleep(300 * time.Millisecond) // let the ring settle between rows
	}
	gen.in.Close()
	if o.Out != "" {
		if err := os.MkdirAll(o.Out, 0o755); err != nil {
			return res, err
		}
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(filepath.Join(o.Out, "bench-trace.json"), append(b, '\n'), 0o644); err != nil {
			return res, err
		}
		if err := os.WriteFile(filepath.Join(o.Out, "bench-trace.md"), []byte(res.Markdown()), 0o644); err != nil {
			return res, err
		}
	}
	return res, nil
}

// Markdown is the table of rows and the verdict on the goal.
func (r *TraceResults) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## Policy trace events: rate a node sustains with none lost\n\n")
	fmt.Fprintf(&b, "%s, kernel %s, %d CPUs, load average at start %s. New denied flows through the real `kebpf_np_to` program (BPF_PROG_TEST_RUN, "+
		"one generator process paced to the target rate, %s per row); the agent's PolicyReader reads `kebpf_np_events` "+
		"(%d KiB, the default) into its Hub; one following client drains its queue (%d lines, the agent's --trace-queue) and JSON-encodes every line. "+
		"CPU is the reading process's user+system time (getrusage RUSAGE_SELF: reader, hub, client; the generator is "+
		"another process) from the row's start until every event was delivered or announced, divided by the generation time.\n\n",
		r.Date.Format("2006-01-02"), r.Kernel, r.CPUs, r.LoadAvg, r.Duration, r.RingSize>>10, r.Queue)
	b.WriteString("| target/s | achieved/s | sent | delivered | lost (kernel) | lost (slow client) | reader CPU (cores) |\n")
	b.WriteString("|---:|---:|---:|---:|---:|---:|---:|\n")
	best := 0.0
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %d | %.0f | %d | %d | %d | %d | %.2f |\n", row.Target, row.Achieved, row.Sent, row.Delivered,
			row.LostKern, row.LostSlow, row.CPU)
		// The generator paces by the clock and ends a hair short of its
		// target (the last sleep): a row counts at its target when it
		// reached 99% of it.
		if row.LostKern+row.LostSlow == 0 && row.Delivered == row.Sent && row.CPU < 1 && row.Achieved >= 0.99*float64(row.Target) &&
			float64(row.Target) > best {
			best = float64(row.Target)
		}
	}
	met := "not met"
	if best >= traceAllow {
		met = "met"
	}
	fmt.Fprintf(&b, "\nGoal (>= %d events/s with none lost, under one core): **%s**; highest target rate reached (>= 99%%) with none lost and under one core: %.0f/s.\n",
		traceAllow, met, best)
	return b.String()
}

type noNames struct{}

func (noNames) PolicyName(uint32) (string, bool)                { return "bench/deny-all", true }
func (noNames) PodByIP(netip.Addr) (types.NamespacedName, bool) { return types.NamespacedName{}, false }

func rusage() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

func numCPU() int {
	var set unix.CPUSet
	if unix.SchedGetaffinity(0, &set) != nil {
		return 0
	}
	return set.Count()
}

// runTraceGen is the generator child: for each "rate nanoseconds base" line
// on stdin, pushes new denied flows (sources from base on) through the
// kebpf_np_to program of the pinned maps at rate for that long, then
// answers "sent nanoseconds".
func runTraceGen(in io.Reader, out io.Writer) error {
	pinDir := os.Getenv("KEBPF_BENCH_PIN_DIR")
	if pinDir == "" {
		return errors.New("KEBPF_BENCH_PIN_DIR unset")
	}
	objs, err := netpol.Load(pinDir, netpol.LoadOptions{})
	if err != nil {
		return err
	}
	defer objs.Close()
	_, to := objs.Programs()
	pod := netip.MustParseAddr(tracePod).As4()
	frame := make([]byte, 14+20+20)
	binary.BigEndian.PutUint16(frame[12:], 0x0800)
	ip := frame[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, 6
	binary.BigEndian.PutUint16(ip[2:], 40)
	copy(ip[16:], pod[:])
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[2:], 80)
	tcp[12], tcp[13] = 0x50, 0x02
	opts := &ebpf.RunOptions{Data: frame}
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		var rate, ns, base int64
		if _, err := fmt.Sscan(sc.Text(), &rate, &ns, &base); err != nil {
			return fmt.Errorf("bad request %q: %w", sc.Text(), err)
		}
		dur := time.Duration(ns)
		var sent int64
		start := time.Now()
		for {
			el := time.Since(start)
			if el >= dur {
				break
			}
			due := int64(el.Seconds() * float64(rate))
			if sent >= due {
				time.Sleep(50 * time.Microsecond)
				continue
			}
			for ; sent < due; sent++ {
				i := base + sent
				// A new flow each: source 10.128-191.x.y, port i.
				ip[12], ip[13], ip[14], ip[15] = 10, byte(128+(i>>24)&63), byte(i>>16), byte(i>>8)
				binary.BigEndian.PutUint16(tcp[0:], uint16(i))
				if _, err := to.Run(opts); err != nil {
					return fmt.Errorf("prog run: %w", err)
				}
			}
		}
		if _, err := fmt.Fprintf(out, "%d %d\n", sent, time.Since(start).Nanoseconds()); err != nil {
			return err
		}
	}
	return sc.Err()
}
