//go:build linux

package bench

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// Point is one mode at one number of Services: every number is the median
// over the rounds in Samples that produced numbers (a bench.json from before
// rounds has no Samples and one measurement per point).
type Point struct {
	Mode     string `json:"mode"`
	Services int    `json:"services"`
	ServiceNumbers
	// Rounds is how many of Samples produced numbers.
	Rounds  int             `json:"rounds,omitempty"`
	Samples []ServiceSample `json:"samples,omitempty"`
}

// ServiceSample is one round of one Service datapath at one scale; Seconds
// is the wall time of start, program, samples and stop.
type ServiceSample struct {
	RoundSlot
	ServiceNumbers
}

// ServiceNumbers are what one measurement of a Service datapath yields: a
// cold controller start until the last Service answers, then connect()
// latency to it.
type ServiceNumbers struct {
	// ProgramSeconds: controller start (cold) to the last Service answering.
	ProgramSeconds float64 `json:"programSeconds,omitempty"`
	P50us          float64 `json:"p50us,omitempty"`
	P99us          float64 `json:"p99us,omitempty"`
	ConnPerSec     float64 `json:"connPerSec,omitempty"`
	Errors         int     `json:"errors,omitempty"`
	RSSKB          int64   `json:"rssKB,omitempty"`
	NA             string  `json:"na,omitempty"`
}

// RoundSlot places one sample of either table in its run.
type RoundSlot struct {
	Round   int     `json:"round"` // 0-based
	Slot    int     `json:"slot"`  // position in the round's rotated order, 0 first
	Seconds float64 `json:"seconds"`
}

// Bulk is the create-then-answer and endpoint-change phase of one mode.
type Bulk struct {
	Services            int     `json:"services,omitempty"`
	Endpoints           int     `json:"endpoints,omitempty"`
	CreateSeconds       float64 `json:"createSeconds,omitempty"`       // API writes of all Services + slices
	AllAnsweringSeconds float64 `json:"allAnsweringSeconds,omitempty"` // first create to every Service answering
	LagSeconds          float64 `json:"lagSeconds"`                    // last create to every Service answering
	RSSKB               int64   `json:"rssKB,omitempty"`
	Changes             int     `json:"changes,omitempty"`
	ChangeP50ms         float64 `json:"changeP50ms,omitempty"`
	ChangeP99ms         float64 `json:"changeP99ms,omitempty"`
	ChangeMaxms         float64 `json:"changeMaxms,omitempty"`
	NA                  string  `json:"na,omitempty"`
}

// Machine is a run's metadata, read from this machine and the build at
// run time.
type Machine struct {
	Host      string `json:"host"`
	Kernel    string `json:"kernel"`
	CPUs      int    `json:"cpus"`
	CPUModel  string `json:"cpuModel"`
	GoVersion string `json:"goVersion,omitempty"`
	Revision  string `json:"revision,omitempty"` // git revision of the bench's source
}

func thisMachine() Machine {
	host, _ := os.Hostname()
	return Machine{Host: host, Kernel: kernelRelease(), CPUs: runtime.NumCPU(), CPUModel: cpuModel(),
		GoVersion: runtime.Version(), Revision: revision()}
}

// String is the report's line of it.
func (m Machine) String() string {
	return fmt.Sprintf("machine: %s, %d CPUs (%s); kernel %s; built from revision %s with %s",
		m.Host, m.CPUs, m.CPUModel, m.Kernel, orUnknown(m.Revision), orUnknown(m.GoVersion))
}

// Results is everything a run measured (bench.json). The metadata at the
// top is the run's that measured the Service and NetworkPolicy tables (an
// l7-only run keeps the previous one's); the L7 table has its own.
type Results struct {
	Date string `json:"date"`
	Machine
	Iptables string `json:"iptablesVersion,omitempty"`
	Ipset    string `json:"ipsetVersion,omitempty"`

	Modes    []string `json:"modes"`
	Scales   []int    `json:"scales"`
	LatCount int      `json:"connectsPerSample"`
	// Rounds per scale of the Service table (0 in a bench.json from before
	// rounds); KubeProxy and Etcd are the versions its binaries reported.
	Rounds        int             `json:"rounds,omitempty"`
	KubeProxy     string          `json:"kubeProxyVersion,omitempty"`
	Etcd          string          `json:"etcdVersion,omitempty"`
	CreateSeconds map[int]float64 `json:"createSeconds"` // API time to grow the scale set to N
	Scale         []Point         `json:"scale"`
	Bulk          map[string]Bulk `json:"bulk"`

	// NetworkPolicy bench (mode netpol), possibly from another run than
	// the Service rows (NetpolDate).
	NetpolDate      string  `json:"netpolDate,omitempty"`
	PolicyScales    []int   `json:"policyScales,omitempty"`
	NetpolConns     int     `json:"netpolConnectionsPerSample,omitempty"`
	NetpolRRSeconds float64 `json:"netpolUDPRRSecondsPerSample,omitempty"`
	// NetpolFlowsSeconds: UDP new-flow time per sample; NetpolRounds:
	// rounds per scale (0 in a bench.json from before rounds).
	NetpolFlowsSeconds float64       `json:"netpolUDPNewFlowsSecondsPerSample,omitempty"`
	NetpolRounds       int           `json:"netpolRounds,omitempty"`
	Netpol             []NetpolPoint `json:"netpol,omitempty"`

	// L7 bench (mode l7), possibly from another run (L7.Date).
	L7 *L7Results `json:"l7,omitempty"`
}

// carryOver keeps the rows of dir/bench.json this run does not measure, so
// `--modes netpol` adds the policy table beside the Service and L7 tables
// instead of replacing them (and so on for each table).
func (r *Results) carryOver(dir string, svc, np, l7 bool, log *slog.Logger) {
	if !svc {
		// Nothing measured: no Service table unless a previous run had one.
		r.Scales, r.LatCount = nil, 0
	}
	if dir == "" || (svc && np && l7) {
		return
	}
	b, err := os.ReadFile(filepath.Join(dir, "bench.json"))
	if err != nil {
		return
	}
	var old Results
	if err := json.Unmarshal(b, &old); err != nil {
		log.Warn("previous bench.json unreadable, not kept", "err", err)
		return
	}
	if !svc {
		r.Date, r.Modes, r.Scales, r.LatCount = old.Date, serviceModes(old.Modes), old.Scales, old.LatCount
		r.Rounds, r.KubeProxy, r.Etcd = old.Rounds, old.KubeProxy, old.Etcd
		r.CreateSeconds, r.Scale, r.Bulk = old.CreateSeconds, old.Scale, old.Bulk
		if r.CreateSeconds == nil {
			r.CreateSeconds = map[int]float64{}
		}
		if r.Bulk == nil {
			r.Bulk = map[string]Bulk{}
		}
	}
	if !np {
		r.NetpolDate, r.PolicyScales, r.NetpolConns, r.NetpolRRSeconds, r.Netpol =
			old.NetpolDate, old.PolicyScales, old.NetpolConns, old.NetpolRRSeconds, old.Netpol
		r.NetpolFlowsSeconds, r.NetpolRounds = old.NetpolFlowsSeconds, old.NetpolRounds
	}
	if !l7 {
		r.L7 = old.L7
	}
	if !svc && !np {
		// Only the L7 table is new: the header stays the other tables'.
		r.Machine, r.Iptables, r.Ipset = old.Machine, old.Iptables, old.Ipset
	}
}

func newResults(o Options) *Results {
	return &Results{
		Date: time.Now().UTC().Format(time.RFC3339), Machine: thisMachine(),
		Iptables: toolVersion("iptables", "--version"), Ipset: toolVersion("ipset", "--version"),
		Modes: serviceModes(o.Modes), Scales: o.Scales, LatCount: o.LatCount, Rounds: o.Rounds,
		CreateSeconds: map[int]float64{}, Bulk: map[string]Bulk{},
	}
}

// Point looks up one measurement.
func (r *Results) Point(mode string, n int) (Point, bool) {
	return find(r.Scale, func(p Point) bool { return p.Mode == mode && p.Services == n })
}

func (r *Results) write(dir string, log *slog.Logger) {
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Warn("write results", "err", err)
		return
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "bench.json"), append(b, '\n'), 0o644); err != nil {
		log.Warn("write bench.json", "err", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bench.md"), []byte(r.Markdown()), 0o644); err != nil {
		log.Warn("write bench.md", "err", err)
	}
	if err := r.plot(filepath.Join(dir, "connect-latency.png")); err != nil {
		log.Warn("write connect-latency.png", "err", err)
	}
}

var columnTitle = map[string]string{
	ModeDirect: "direct", ModeSocklb: "socket LB", ModeIptables: "kube-proxy iptables", ModeNftables: "kube-proxy nftables",
}

func human(n int) string {
	switch {
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	default:
		return fmt.Sprint(n)
	}
}

func shortNA(s string) string {
	s = strings.ReplaceAll(strings.SplitN(s, "\n", 2)[0], "|", "/")
	if len(s) > 80 {
		s = s[:80] + "…"
	}
	return "n/a (" + s + ")"
}

// Markdown renders one row per metric, one column per datapath.
func (r *Results) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# kubectl-ebpf benchmark\n\n")
	fmt.Fprintf(&b, "- date: %s\n- machine: %s, %d CPUs (%s)\n- kernel: %s\n", r.Date, r.Host, r.CPUs, r.CPUModel, r.Kernel)
	fmt.Fprintf(&b, "- built from revision %s with %s; %s, %s\n", orUnknown(r.Revision), orUnknown(r.GoVersion), orUnknown(r.Iptables), orUnknown(r.Ipset))
	if len(r.Scale) > 0 || len(r.Bulk) > 0 {
		r.serviceMarkdown(&b)
	}
	if len(r.Netpol) > 0 {
		r.netpolMarkdown(&b)
	}
	if r.L7 != nil {
		r.l7Markdown(&b)
	}
	return b.String()
}

func (r *Results) serviceMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "- %s (kube-proxy's defaults, minSyncPeriod 1s; its iptables mode through %s), %s on tmpfs, all inside private netns\n",
		orUnknown(r.KubeProxy), orUnknown(r.Iptables), orUnknown(r.Etcd))
	fmt.Fprintf(b, "- connect(): %d TCP connects per sample, from one client to the last-created Service (1 endpoint), closed with RST\n", r.LatCount)
	if r.Rounds > 0 {
		fmt.Fprintf(b, "- rounds: %d per scale; a round starts every datapath cold in turn, waits until the last Service answers, measures and stops it, in an order rotated per round (%s, then %s, ...), so drift of the machine hits every column alike\n",
			r.Rounds, strings.Join(rotation(r.Modes, 0), " "), strings.Join(rotation(r.Modes, 1), " "))
		fmt.Fprintf(b, "- scale cells: median over the rounds (min–max in parentheses); [k/R rounds] marks a cell where only k rounds produced numbers; the bulk and EndpointSlice rows are one run per datapath\n")
	}
	fmt.Fprintln(b)
	row := table(b, r.Modes, columnTitle)
	scaleRow := func(name string, n int, f func(p Point) string) {
		row(name, func(m string) string {
			p, ok := r.Point(m, n)
			return cell(ok, p.NA, p.Rounds, len(p.Samples), func() string { return f(p) })
		})
	}
	for _, n := range r.Scales {
		scaleRow(fmt.Sprintf("connect() p50 / p99 µs, %s Services", human(n)), n, func(p Point) string {
			return statCell(p.Samples, "%.1f", p.P50us, func(s ServiceSample) float64 { return s.P50us }) + " / " +
				statCell(p.Samples, "%.1f", p.P99us, func(s ServiceSample) float64 { return s.P99us })
		})
		scaleRow(fmt.Sprintf("connections/s, %s Services", human(n)), n, func(p Point) string {
			return statCell(p.Samples, "%.0f", p.ConnPerSec, func(s ServiceSample) float64 { return s.ConnPerSec })
		})
		scaleRow(fmt.Sprintf("cold start to last Service answering, %s Services", human(n)), n, func(p Point) string {
			if p.Mode == ModeDirect {
				return "—"
			}
			return statCell(p.Samples, "%.2f", p.ProgramSeconds, func(s ServiceSample) float64 { return s.ProgramSeconds }) + " s"
		})
	}
	for _, n := range r.Scales {
		if n < 10000 {
			continue
		}
		scaleRow(fmt.Sprintf("RSS, %s Services", human(n)), n, func(p Point) string {
			if p.RSSKB == 0 {
				return "—"
			}
			return fmt.Sprintf("%.0f MB", float64(p.RSSKB)/1024)
		})
	}
	bulkRow := func(name string, f func(b Bulk) string) {
		row(name, func(m string) string {
			bk, ok := r.Bulk[m]
			return cell(ok, bk.NA, 0, 0, func() string { return f(bk) })
		})
	}
	var bulk Bulk
	for _, bk := range r.Bulk {
		if bk.Services > 0 {
			bulk = bk
		}
	}
	if bulk.Services > 0 {
		label := fmt.Sprintf("%s Services x %d endpoints", human(bulk.Services), bulk.Endpoints)
		bulkRow("API time to create "+label, func(b Bulk) string { return fmt.Sprintf("%.1f s", b.CreateSeconds) })
		bulkRow("first create to all answering, "+label, func(b Bulk) string { return fmt.Sprintf("%.1f s", b.AllAnsweringSeconds) })
		bulkRow("last create to all answering, "+label, func(b Bulk) string { return fmt.Sprintf("%.3f s", b.LagSeconds) })
		bulkRow("RSS at "+label, func(b Bulk) string { return fmt.Sprintf("%.0f MB", float64(b.RSSKB)/1024) })
	}
	changes := 0
	for _, bk := range r.Bulk {
		changes = max(changes, bk.Changes)
	}
	if changes > 0 {
		bulkRow(fmt.Sprintf("EndpointSlice change to new backend used, p50 / p99 ms (%d changes)", changes), func(b Bulk) string {
			return fmt.Sprintf("%.1f / %.1f", b.ChangeP50ms, b.ChangeP99ms)
		})
	}
	fmt.Fprintf(b, "\nRSS: agent = the socket-LB process (socklb datapath + servicelb sync, the agent's service-LB half); kube-proxy = its process. Kernel map/rule memory is not in RSS.\n")
	if len(r.CreateSeconds) > 0 {
		fmt.Fprintf(b, "\nAPI time to grow the scale set (1 endpoint each):")
		for _, n := range r.Scales {
			if s, ok := r.CreateSeconds[n]; ok {
				fmt.Fprintf(b, " %s: %.1f s;", human(n), s)
			}
		}
		fmt.Fprintln(b)
	}
}

// table writes the header of a markdown table with a metric column and one
// column per key, and returns the function that writes a row.
func table(b *strings.Builder, keys []string, title map[string]string) (row func(name string, cell func(key string) string)) {
	fmt.Fprintf(b, "| metric |")
	for _, k := range keys {
		fmt.Fprintf(b, " %s |", title[k])
	}
	fmt.Fprintf(b, "\n|---|%s\n", strings.Repeat("---|", len(keys)))
	return func(name string, cell func(key string) string) {
		fmt.Fprintf(b, "| %s |", name)
		for _, k := range keys {
			fmt.Fprintf(b, " %s |", cell(k))
		}
		fmt.Fprintln(b)
	}
}

// cell renders one measured cell: "—" when not measured, n/a with the reason,
// else the numbers and, for a median over fewer rounds than ran, a note.
func cell(ok bool, na string, rounds, samples int, numbers func() string) string {
	switch {
	case !ok:
		return "—"
	case na != "":
		return shortNA(na)
	}
	return numbers() + roundsNote(rounds, samples)
}

// orUnknown stands in for metadata a bench.json from before it was
// recorded lacks.
func orUnknown(s string) string {
	if s == "" {
		return "(not recorded)"
	}
	return s
}

func (r *Results) plot(path string) error {
	p := plot.New()
	p.Title.Text = "connect() p50 to the last-created Service"
	p.X.Label.Text = "Services"
	p.Y.Label.Text = "µs"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	var lines []any
	for _, m := range r.Modes {
		var xys plotter.XYs
		for _, n := range r.Scales {
			if pt, ok := r.Point(m, n); ok && pt.NA == "" && pt.P50us > 0 {
				xys = append(xys, plotter.XY{X: float64(n), Y: pt.P50us})
			}
		}
		if len(xys) > 0 {
			lines = append(lines, columnTitle[m], xys)
		}
	}
	if len(lines) == 0 {
		return nil
	}
	if err := plotutil.AddLinePoints(p, lines...); err != nil {
		return err
	}
	p.Y.Min = 0
	p.Legend.Top = true
	p.Legend.Left = true
	return p.Save(7*vg.Inch, 4.5*vg.Inch, path)
}
