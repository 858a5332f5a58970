// Package trace implements `kubectl ebpf trace` (every node's datapath
// decisions, merged by time) and `kubectl ebpf trace policy` (why a
// connection would be allowed or denied). Both reach each node's agent on
// its loopback port by a port-forward through the API server, with the
// user's own RBAC; nothing listens on the node's network.
package trace

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// ExitIncomplete is the exit status of a trace (not -f) that printed its
// lines but knows it misses some: events were lost (the inline notices say
// how many, on which node and where) or a node's agent could not be read.
const ExitIncomplete = 3

// DefaultWindow is how long a followed trace holds each line to put the
// nodes' streams in time order.
const DefaultWindow = 250 * time.Millisecond

// Options are the inputs of one trace.
type Options struct {
	kube.Conn
	genericiooptions.IOStreams

	AllNamespaces bool
	Pods          []string
	FromPods      []string
	ToPods        []string
	Nodes         []string
	Types         []string
	Verdicts      []string
	Ports         []int
	Protocols     []string
	Since         time.Duration
	Last          int
	Follow        bool
	Output        string

	// Dial reaches an agent pod (default: port-forward through the API
	// server).
	Dial Dialer
	// Window is the follow reorder window (default DefaultWindow).
	Window time.Duration
	// Now is the clock --since counts back from.
	Now func() time.Time
	// Location is the time zone of table times (default local).
	Location *time.Location
	// Retry is how often a followed node whose stream ended is looked for
	// again (default 1s).
	Retry time.Duration

	// Namespace is the kubeconfig's (or -n's) namespace, ExplicitNamespace
	// whether -n gave it; Complete sets both from the flags.
	Namespace         string
	ExplicitNamespace bool

	query apiv1.TraceQuery
}

// NewCmd returns the trace command, with `trace policy` under it.
func NewCmd(flags *genericclioptions.ConfigFlags, streams genericiooptions.IOStreams) *cobra.Command {
	o := &Options{Conn: kube.Conn{Flags: flags}, IOStreams: streams}
	cmd := &cobra.Command{
		Use:   "trace",
		Short: "Show the datapath's decisions from every node, with pod and policy names",
		Long: "Streams every node agent's trace events (policy verdicts naming the NetworkPolicy and rule, or the policy " +
			"whose default deny applied; service LB, CNI and L7 decisions), merged by time. Each agent is reached by a " +
			"port-forward through the API server: you need list pods and create pods/portforward in kubectl-ebpf-system.\n\n" +
			"Without -f it prints the agents' kept history and exits: 0, or 3 when events were lost or a node could not " +
			"be read (the output says which).",
		Example: `  # why is my call dropped?
  kubectl ebpf trace -n shop --pod frontend --verdict denied
  # follow new denials anywhere
  kubectl ebpf trace -A -f --verdict denied
  # the last 20 events of the last 5 minutes, as JSON lines
  kubectl ebpf trace --since 5m --last 20 -o json`,
		Args: cobra.NoArgs,
		RunE: cmdutil.RunE(o),
	}
	f := cmd.Flags()
	f.BoolVarP(&o.AllNamespaces, "all-namespaces", "A", false, "events of every namespace (default: either end in the current namespace, -n)")
	f.StringSliceVar(&o.Pods, "pod", nil, "[namespace/]pod at either end (repeatable; namespace defaults to -n)")
	f.StringSliceVar(&o.FromPods, "from-pod", nil, "[namespace/]pod at the source")
	f.StringSliceVar(&o.ToPods, "to-pod", nil, "[namespace/]pod at the destination")
	f.StringSliceVar(&o.Nodes, "node", nil, "only this node's events (and only its agent is asked)")
	f.StringSliceVar(&o.Types, "type", nil, "event type: "+strings.Join(apiv1.TraceTypes, ", "))
	f.StringSliceVar(&o.Verdicts, "verdict", nil, "verdict: "+strings.Join(apiv1.TraceVerdicts, ", "))
	f.IntSliceVar(&o.Ports, "port", nil, "port at either end")
	f.StringSliceVar(&o.Protocols, "protocol", nil, "TCP, UDP, SCTP, ICMP or ICMPv6")
	f.DurationVar(&o.Since, "since", 0, "only events of the last DURATION (e.g. 5m)")
	f.IntVar(&o.Last, "last", 0, "only the last N events (of all nodes, merged); with -f the history to show first")
	f.BoolVarP(&o.Follow, "follow", "f", false, "keep printing new events until interrupted")
	f.StringVarP(&o.Output, "output", "o", "", `"table" (default), "wide" (adds process, reason and message) or "json" (one object per line)`)
	cmd.AddCommand(newPolicyCmd(flags, streams))
	return cmd
}

// verdictAliases are words users bring from other tools.
var verdictAliases = map[string]string{
	"deny": apiv1.TraceVerdictDenied, "drop": apiv1.TraceVerdictDenied, "dropped": apiv1.TraceVerdictDenied,
	"allow": apiv1.TraceVerdictAllowed, "forwarded": apiv1.TraceVerdictAllowed,
}

var knownProtocols = []string{"TCP", "UDP", "SCTP", "ICMP", "ICMPV6"}

// Complete reads the namespace from the kubeconfig and maps the flags to
// the query the agents apply.
func (o *Options) Complete(_ []string) error {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Window <= 0 {
		o.Window = DefaultWindow
	}
	if o.Location == nil {
		o.Location = time.Local
	}
	if o.Retry <= 0 {
		o.Retry = time.Second
	}
	if o.Flags != nil {
		ns, explicit, err := o.Flags.ToRawKubeConfigLoader().Namespace()
		if err != nil {
			return fmt.Errorf("namespace from kubeconfig: %w", err)
		}
		o.Namespace, o.ExplicitNamespace = ns, explicit
	}
	if o.Namespace == "" {
		o.Namespace = "default"
	}
	q, err := o.buildQuery(o.Now())
	if err != nil {
		return err
	}
	o.query = q
	return nil
}

// buildQuery maps the flags to a TraceQuery. The namespace filter is the
// current namespace unless -A, or unless pods were named with their own
// namespace and -n was not given: `--pod shop/web` finds shop/web whatever
// the kubeconfig's namespace is. A pod named without a namespace is in the
// current one (any namespace with -A).
func (o *Options) buildQuery(now time.Time) (apiv1.TraceQuery, error) {
	q := apiv1.TraceQuery{Follow: o.Follow, Last: o.Last}
	podNS := o.Namespace
	if o.AllNamespaces {
		podNS = ""
	}
	qualified := false
	refs := func(flag string, in []string) ([]apiv1.TracePodRef, error) {
		var out []apiv1.TracePodRef
		for _, s := range in {
			ns, name, ok := strings.Cut(s, "/")
			if !ok {
				ns, name = podNS, s
			} else {
				qualified = true
			}
			if name == "" || strings.Contains(name, "/") || (ok && ns == "") {
				return nil, fmt.Errorf("invalid --%s %q: want [namespace/]pod", flag, s)
			}
			out = append(out, apiv1.TracePodRef{Namespace: ns, Name: name})
		}
		return out, nil
	}
	var err error
	if q.Pods, err = refs("pod", o.Pods); err != nil {
		return q, err
	}
	if q.FromPods, err = refs("from-pod", o.FromPods); err != nil {
		return q, err
	}
	if q.ToPods, err = refs("to-pod", o.ToPods); err != nil {
		return q, err
	}
	if !o.AllNamespaces && (o.ExplicitNamespace || !qualified) {
		q.Namespaces = []string{o.Namespace}
	}
	q.Nodes = slices.Clone(o.Nodes)
	q.Types = slices.Clone(o.Types)
	for _, v := range o.Verdicts {
		v = strings.ToLower(v)
		if a, ok := verdictAliases[v]; ok {
			v = a
		}
		if !slices.Contains(q.Verdicts, v) {
			q.Verdicts = append(q.Verdicts, v)
		}
	}
	for _, p := range o.Ports {
		if p < 1 || p > 65535 {
			return q, fmt.Errorf("invalid --port %d: want 1 to 65535", p)
		}
		q.Ports = append(q.Ports, uint16(p))
	}
	for _, p := range o.Protocols {
		up := strings.ToUpper(p)
		if !slices.Contains(knownProtocols, up) {
			return q, fmt.Errorf("invalid --protocol %q: want one of TCP, UDP, SCTP, ICMP, ICMPv6", p)
		}
		if up == "ICMPV6" {
			up = "ICMPv6"
		}
		q.Protocols = append(q.Protocols, up)
	}
	if o.Since < 0 {
		return q, fmt.Errorf("invalid --since %s: must be positive", o.Since)
	}
	if o.Since > 0 {
		q.Since = now.Add(-o.Since).UTC()
	}
	if o.Last < 0 || o.Last > apiv1.TraceMaxLast {
		return q, fmt.Errorf("invalid --last %d: want 0 to %d", o.Last, apiv1.TraceMaxLast)
	}
	// The agents parse exactly this; a value they would refuse is refused
	// here, with the same words, before any connection.
	v, _ := url.ParseQuery(q.Encode())
	if _, err := apiv1.ParseTraceQuery(v); err != nil {
		return q, fmt.Errorf("invalid filter: %w", err)
	}
	return q, nil
}

// Validate checks the flags; no API call.
func (o *Options) Validate() error {
	switch o.Output {
	case "", "table", "wide", "json":
	default:
		return fmt.Errorf("invalid output format %q: want one of table, wide, json", o.Output)
	}
	return nil
}

// Query is the query the agents are sent (after Complete).
func (o *Options) Query() apiv1.TraceQuery { return o.query }

// item is what a node's reader hands the merge: a line, a warning for
// stderr, or the end of that node's stream.
type item struct {
	node string
	line apiv1.TraceLine
	warn string
	// settled: the node's first stream opened (its history follows) or
	// failed to.
	settled bool
	end     bool
	err     error
}

// maxHistoryWait bounds how long a follow waits for every node's first
// stream before printing: a slow node's history then comes late and
// uncut by --last rather than holding back every other node.
const maxHistoryWait = 5 * time.Second

// Run connects to every agent and prints the merged trace.
func (o *Options) Run(ctx context.Context) error {
	c, _, err := o.Connect(ctx)
	if err != nil {
		return err
	}
	if err := checkAccess(ctx, c); err != nil {
		return err
	}
	if o.Dial == nil {
		o.Dial = portForwardDialer(c)
	}
	pods, notRunning, err := agentPods(ctx, c)
	if err != nil {
		return err
	}
	incomplete := false
	for node, why := range notRunning {
		if len(o.Nodes) > 0 && !slices.Contains(o.Nodes, node) {
			continue
		}
		fmt.Fprintf(o.ErrOut, "warning: node %s: not traced: %s\n", node, why)
		incomplete = true
	}
	var nodes []string
	for node := range pods {
		if len(o.Nodes) == 0 || slices.Contains(o.Nodes, node) {
			nodes = append(nodes, node)
		}
	}
	sort.Strings(nodes)
	if len(nodes) == 0 {
		if len(o.Nodes) > 0 {
			return fmt.Errorf("no running agent on node %s", strings.Join(o.Nodes, ", "))
		}
		return fmt.Errorf("no running agent pod in the cluster")
	}

	ctx, cancel := context.WithCancel(ctx)
	items := make(chan item, 256)
	var wg sync.WaitGroup
	// The readers end once ctx is cancelled; wait for them so no
	// port-forward outlives the command.
	defer func() { cancel(); wg.Wait() }()
	start := o.Now()
	for _, node := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if o.Follow {
				o.followNode(ctx, c, node, pods[node], start, items)
			} else {
				_, err = o.stream(ctx, node, pods[node], o.query, items, nil, nil)
			}
			select {
			case items <- item{node: node, end: true, err: err}:
			case <-ctx.Done():
			}
		}()
	}

	var p printer
	var table *tablePrinter
	if o.Output == "json" {
		p = &jsonPrinter{enc: json.NewEncoder(o.Out)}
	} else {
		table = newTablePrinter(o.Out, o.Output == "wide", o.Location)
		p = table
	}
	if o.Follow {
		// The header at once, as `kubectl get -w`: the user sees the
		// trace is running before the first event.
		if table != nil {
			if err := table.Header(); err != nil {
				return err
			}
		}
		return o.follow(ctx, items, len(nodes), p, start)
	}
	return o.once(ctx, items, len(nodes), p, table, incomplete)
}

// followNode keeps one node's stream open across agent restarts: when it
// ends, the node's new agent pod is looked for every Retry and asked for
// what it has seen since the last line read (the datapath's ring buffer is
// pinned, so the new agent reads what was decided while none ran), then
// for new events. It returns when ctx is done.
func (o *Options) followNode(ctx context.Context, c *kube.Clients, node string, pod *corev1.Pod, start time.Time, items chan<- item) {
	warn := func(format string, a ...any) {
		select {
		case items <- item{node: node, warn: fmt.Sprintf("node %s: ", node) + fmt.Sprintf(format, a...)}:
		case <-ctx.Done():
		}
	}
	var last time.Time // of the last line read
	q := o.query
	failing := false // a failure to connect was reported, not repeated
	settled := false
	settle := func() {
		if settled {
			return
		}
		settled = true
		select {
		case items <- item{node: node, settled: true}:
		case <-ctx.Done():
		}
	}
	for {
		opened, err := o.stream(ctx, node, pod, q, items, &last, settle)
		settle()
		if ctx.Err() != nil {
			return
		}
		if !opened && !failing {
			failing = true
			warn("%v; retrying", err)
		}
		if opened {
			failing = false
			why := "trace stream ended"
			if err != nil {
				why = err.Error()
			}
			warn("%s (agent restarted?); waiting for its agent", why)
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(o.Retry):
			}
			pods, _, err := agentPods(ctx, c)
			if err == nil && pods[node] != nil {
				if opened || pods[node].Name != pod.Name {
					warn("reading agent pod %s", pods[node].Name)
				}
				pod = pods[node]
				break
			}
		}
		since := last
		if since.IsZero() {
			since = start
		}
		q = o.query
		q.Since, q.Last = since.Add(time.Nanosecond).UTC(), apiv1.TraceMaxLast
	}
}

// stream reads one node's /trace with q into items until it ends; opened
// says whether the agent answered, and onOpen (when set) is called then.
// last, when set, tracks the time of the last line read.
func (o *Options) stream(ctx context.Context, node string, pod *corev1.Pod, q apiv1.TraceQuery, items chan<- item, last *time.Time, onOpen func()) (opened bool, err error) {
	client, closeConn, err := o.Dial(ctx, pod)
	if err != nil {
		return false, err
	}
	defer closeConn()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, agentURL(apiv1.TracePath, q.Encode()), nil)
	if err != nil {
		return false, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, fmt.Errorf("agent pod %s: %w", pod.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, agentError(node, resp)
	}
	if onOpen != nil {
		onOpen()
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var l apiv1.TraceLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return true, fmt.Errorf("agent pod %s sent a line that is not a trace line: %w", pod.Name, err)
		}
		if l.Event == nil && l.Lost == nil {
			continue
		}
		if last != nil && l.Event != nil && l.Event.Time.After(*last) {
			*last = l.Event.Time
		}
		select {
		case items <- item{node: node, line: l}:
		case <-ctx.Done():
			return true, nil
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return true, fmt.Errorf("agent pod %s: %w", pod.Name, err)
	}
	return true, nil
}

// once collects every node's history, sorts it by time, keeps the last N
// and prints it.
func (o *Options) once(ctx context.Context, items <-chan item, nodes int, p printer, table *tablePrinter, incomplete bool) error {
	var lines []apiv1.TraceLine
	var errs []error
	for open := nodes; open > 0; {
		select {
		case it := <-items:
			if it.warn != "" {
				fmt.Fprintf(o.ErrOut, "warning: %s\n", it.warn)
				continue
			}
			if it.end {
				open--
				if it.err != nil {
					errs = append(errs, fmt.Errorf("node %s: %w", it.node, it.err))
				}
				continue
			}
			lines = append(lines, it.line)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if len(errs) == nodes {
		return errors.Join(errs...)
	}
	for _, err := range errs {
		fmt.Fprintf(o.ErrOut, "warning: %v\n", err)
		incomplete = true
	}
	sortLines(lines)
	lines = lastEvents(lines, o.Last)
	if table != nil {
		table.fit(lines)
	}
	events := 0
	for i := range lines {
		if lines[i].Lost != nil {
			incomplete = true
		} else {
			events++
		}
		if err := p.Line(&lines[i]); err != nil {
			return err
		}
	}
	if events == 0 {
		fmt.Fprintln(o.ErrOut, "No matching events.")
	}
	if incomplete {
		return &cmdutil.ExitError{Code: ExitIncomplete}
	}
	return nil
}

// follow prints lines as they come, held for the reorder window. The
// history of every node arrives first; --last N applies to it merged, so
// nothing is printed until every node's stream is open (or failed) and one
// window more has passed for the history the agents send right after
// their headers (at most maxHistoryWait).
func (o *Options) follow(ctx context.Context, items <-chan item, nodes int, p printer, start time.Time) error {
	m := newMerger(o.Window)
	open := nodes
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	historyDue := time.Now().Add(maxHistoryWait)
	historyDone := false
	settled := 0
	for {
		now := time.Now()
		if !historyDone && !now.Before(historyDue) {
			historyDone = true
			m.trimHistory(start, o.Last)
		}
		if historyDone {
			for _, l := range m.pop(now) {
				if err := p.Line(&l); err != nil {
					return err
				}
			}
		}
		next := historyDue
		if historyDone {
			next = now.Add(time.Hour)
			if d, ok := m.due(); ok {
				next = d
			}
		}
		timer.Reset(time.Until(next))
		select {
		case it := <-items:
			if it.warn != "" {
				fmt.Fprintf(o.ErrOut, "warning: %s\n", it.warn)
				continue
			}
			if it.settled {
				if settled++; settled == nodes {
					if d := time.Now().Add(o.Window); d.Before(historyDue) {
						historyDue = d
					}
				}
				continue
			}
			if !it.end {
				m.push(it.line, time.Now())
				continue
			}
			open--
			if it.err != nil {
				fmt.Fprintf(o.ErrOut, "warning: node %s: %v\n", it.node, it.err)
			} else if ctx.Err() == nil {
				fmt.Fprintf(o.ErrOut, "warning: node %s: trace stream ended (agent restarted?)\n", it.node)
			}
			if open == 0 {
				for _, l := range m.drain() {
					if err := p.Line(&l); err != nil {
						return err
					}
				}
				if ctx.Err() != nil {
					return nil
				}
				return errors.New("every node's trace stream ended")
			}
		case <-timer.C:
		case <-ctx.Done():
			// Interrupted: what is held goes out, in order.
			for _, l := range m.drain() {
				if err := p.Line(&l); err != nil {
					return err
				}
			}
			return nil
		}
	}
}

// readJSON reads a small JSON answer.
func readJSON(r io.Reader, v any) error {
	b, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}
