package trace

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// printer writes trace lines in one -o format.
type printer interface {
	// Line writes one line (an event or a lost notice).
	Line(l *apiv1.TraceLine) error
}

// jsonPrinter writes each line as the agent sent it: one apiv1.TraceLine
// object per line.
type jsonPrinter struct{ enc *json.Encoder }

func (p *jsonPrinter) Line(l *apiv1.TraceLine) error { return p.enc.Encode(l) }

// tablePrinter writes aligned columns. Column widths only ever grow, so a
// followed stream stays aligned as far as it can without knowing the lines
// to come; a one-shot trace sizes them from every line first (fit).
type tablePrinter struct {
	w      io.Writer
	wide   bool
	loc    *time.Location
	widths []int
	header bool
}

var (
	tableColumns = []string{"TIME", "NODE", "TYPE", "VERDICT", "SOURCE", "DESTINATION", "PROTO", "INFO"}
	wideColumns  = []string{"TIME", "NODE", "TYPE", "VERDICT", "SOURCE", "DESTINATION", "PROTO", "PROCESS", "INFO", "REASON", "MESSAGE"}
	// minWidths of a followed table: room for typical values, so the
	// first rows do not set the columns too narrow.
	minWidths = map[string]int{"TIME": 12, "NODE": 12, "TYPE": 6, "VERDICT": 10, "SOURCE": 22, "DESTINATION": 22, "PROTO": 5, "PROCESS": 14}
)

func newTablePrinter(w io.Writer, wide bool, loc *time.Location) *tablePrinter {
	p := &tablePrinter{w: w, wide: wide, loc: loc}
	for _, c := range p.columns() {
		p.widths = append(p.widths, max(len(c), minWidths[c]))
	}
	return p
}

func (p *tablePrinter) columns() []string {
	if p.wide {
		return wideColumns
	}
	return tableColumns
}

// fit widens the columns for lines (a one-shot trace knows them all).
func (p *tablePrinter) fit(lines []apiv1.TraceLine) {
	for i := range p.widths {
		p.widths[i] = len(p.columns()[i])
	}
	for i := range lines {
		if lines[i].Event != nil {
			p.grow(p.cells(lines[i].Event))
		}
	}
}

func (p *tablePrinter) grow(cells []string) {
	for i, c := range cells {
		p.widths[i] = max(p.widths[i], len(c))
	}
}

// Header prints the column names once (before the first line at the
// latest).
func (p *tablePrinter) Header() error {
	if p.header {
		return nil
	}
	p.header = true
	return p.row(p.columns())
}

func (p *tablePrinter) Line(l *apiv1.TraceLine) error {
	if err := p.Header(); err != nil {
		return err
	}
	switch {
	case l.Event != nil:
		cells := p.cells(l.Event)
		p.grow(cells)
		return p.row(cells)
	case l.Lost != nil:
		_, err := fmt.Fprintln(p.w, lostText(l.Lost))
		return err
	}
	return nil
}

func (p *tablePrinter) row(cells []string) error {
	var b strings.Builder
	for i, c := range cells {
		if i == len(cells)-1 {
			b.WriteString(c)
			break
		}
		b.WriteString(c)
		b.WriteString(strings.Repeat(" ", p.widths[i]-len(c)+3))
	}
	_, err := fmt.Fprintln(p.w, strings.TrimRight(b.String(), " "))
	return err
}

func (p *tablePrinter) cells(e *apiv1.TraceEvent) []string {
	ts := e.Time.In(p.loc).Format("15:04:05.000")
	if p.wide {
		ts = e.Time.In(p.loc).Format("2006-01-02T15:04:05.000000Z07:00")
	}
	proto := e.Protocol
	if proto == "" {
		proto = "-"
	}
	c := []string{ts, dash(e.Node), dash(e.Type), dash(e.Verdict), peerText(e.Source), peerText(e.Destination), proto}
	if p.wide {
		return append(c, processText(e.Process), dash(infoText(e)), dash(e.Reason), dash(e.Message))
	}
	return append(c, dash(infoText(e)))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// lostText is how a lost notice reads inline.
func lostText(l *apiv1.TraceLost) string {
	what := "events"
	if l.Count == 1 {
		what = "event"
	}
	if l.Type != "" {
		what = l.Type + " " + what
	}
	return fmt.Sprintf("node %s: %d %s lost (%s)", l.Node, l.Count, what, l.Reason)
}

// peerText is ns/pod:port for a pod, ip:port otherwise.
func peerText(p apiv1.TracePeer) string {
	host := p.IP
	if p.Pod != "" {
		host = p.Pod
		if p.Namespace != "" {
			host = p.Namespace + "/" + p.Pod
		}
	}
	if host == "" {
		host = "-"
	}
	if p.Port == 0 {
		return host
	}
	if p.Pod == "" && strings.Contains(host, ":") {
		return net.JoinHostPort(host, strconv.Itoa(int(p.Port)))
	}
	return host + ":" + strconv.Itoa(int(p.Port))
}

func processText(p *apiv1.TraceProcess) string {
	if p == nil || (p.PID == 0 && p.Command == "") {
		return "-"
	}
	if p.Command == "" {
		return strconv.Itoa(int(p.PID))
	}
	return fmt.Sprintf("%d/%s", p.PID, p.Command)
}

// policyName is ns/name of a policy, or its ID when the agent had no name.
func policyName(p *apiv1.TracePolicy) string {
	if p == nil {
		return "?"
	}
	if p.Unknown {
		return fmt.Sprintf("policy id %d (name unknown)", p.ID)
	}
	if p.Namespace == "" {
		return p.Name
	}
	return p.Namespace + "/" + p.Name
}

// infoText names what decided: the policy rule, the default deny, the
// Service, the HTTP request.
func infoText(e *apiv1.TraceEvent) string {
	var parts []string
	pol := policyInfo(e)
	if pol != "" {
		parts = append(parts, pol)
	}
	if s := e.Service; s != nil {
		port := s.Port
		if port == "" {
			port = strconv.Itoa(int(s.PortNumber))
		}
		parts = append(parts, fmt.Sprintf("service %s/%s:%s", s.Namespace, s.Name, port))
	}
	if h := e.HTTP; h != nil {
		r := strings.TrimSpace(strings.Join([]string{h.Method, h.Path}, " "))
		if h.Status != 0 {
			r += " " + strconv.Itoa(h.Status)
		}
		parts = append(parts, "HTTP "+strings.TrimSpace(r))
	}
	if e.Verdict == apiv1.TraceVerdictRedirected {
		// An l7 connect: where it went is the news (the requests on it
		// follow as their own events).
		parts = append(parts, "to this node's Envoy")
	}
	if pol == "" && e.Reason != "" {
		// A feature's own reason (no-endpoints, backend-removed, no-envoy,
		// a CNI refusal); policy reasons are in pol already.
		parts = append(parts, e.Reason)
	}
	return strings.Join(parts, ", ")
}

func policyInfo(e *apiv1.TraceEvent) string {
	var s string
	switch e.Reason {
	case apiv1.TraceReasonPolicy:
		s = "policy " + policyName(e.Policy)
		if e.Policy != nil && e.Policy.Rule != nil {
			s += " rule " + strconv.Itoa(*e.Policy.Rule)
		}
	case apiv1.TraceReasonDefaultDeny:
		s = "default deny of " + policyName(e.Policy)
	case apiv1.TraceReasonNotEnforced:
		s = "no policy selects the pod"
	case apiv1.TraceReasonHost:
		s = "node address"
	case apiv1.TraceReasonRevoked:
		s = "revoked after a policy change"
		if e.Policy != nil {
			s += " (" + policyName(e.Policy) + ")"
		}
	case apiv1.TraceReasonRelated:
		s = "ICMP error of a tracked flow"
	default:
		if e.Policy != nil {
			s = strings.ToLower(e.Policy.Kind) + " " + policyName(e.Policy)
			if e.Policy.Rule != nil {
				s += " rule " + strconv.Itoa(*e.Policy.Rule)
			}
		}
	}
	if s != "" && e.Direction != "" {
		s = e.Direction + ": " + s
	}
	return s
}
