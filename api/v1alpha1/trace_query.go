package v1alpha1

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// TraceMaxLast caps ?last=: a client cannot ask for more history than any ring
// holds.
const TraceMaxLast = 1 << 20

// TracePodRef is a [namespace/]name of `--pod`; an empty Namespace matches the
// name in every namespace.
//
// +kubebuilder:object:generate=false
type TracePodRef struct {
	Namespace, Name string
}

func (p TracePodRef) String() string {
	if p.Namespace == "" {
		return p.Name
	}
	return p.Namespace + "/" + p.Name
}

func (p TracePodRef) matches(peer TracePeer) bool {
	return peer.Pod != "" && peer.Pod == p.Name && (p.Namespace == "" || p.Namespace == peer.Namespace)
}

// TraceFilter selects events. Kinds combine with AND, the values of one kind
// with OR; an empty kind matches everything.
//
// +kubebuilder:object:generate=false
type TraceFilter struct {
	// Namespaces match an event with either end in one of them.
	Namespaces []string
	// Pods match either end; FromPods the source, ToPods the destination.
	Pods, FromPods, ToPods []TracePodRef
	Nodes                  []string
	Types                  []string
	Verdicts               []string
	// Ports match either end's port, or the Service port a connect()
	// addressed (lb events).
	Ports []uint16
	// Protocols match TraceEvent.Protocol, case-insensitively.
	Protocols []string
}

// Match reports whether e passes the filter.
func (f *TraceFilter) Match(e *TraceEvent) bool {
	if len(f.Namespaces) > 0 && !slices.Contains(f.Namespaces, e.Source.Namespace) &&
		!slices.Contains(f.Namespaces, e.Destination.Namespace) {
		return false
	}
	if len(f.Pods) > 0 && !slices.ContainsFunc(f.Pods, func(p TracePodRef) bool {
		return p.matches(e.Source) || p.matches(e.Destination)
	}) {
		return false
	}
	if len(f.FromPods) > 0 && !slices.ContainsFunc(f.FromPods, func(p TracePodRef) bool { return p.matches(e.Source) }) {
		return false
	}
	if len(f.ToPods) > 0 && !slices.ContainsFunc(f.ToPods, func(p TracePodRef) bool { return p.matches(e.Destination) }) {
		return false
	}
	if len(f.Nodes) > 0 && !slices.Contains(f.Nodes, e.Node) {
		return false
	}
	if len(f.Types) > 0 && !slices.Contains(f.Types, e.Type) {
		return false
	}
	if len(f.Verdicts) > 0 && !slices.Contains(f.Verdicts, e.Verdict) {
		return false
	}
	if len(f.Ports) > 0 && !slices.Contains(f.Ports, e.Source.Port) && !slices.Contains(f.Ports, e.Destination.Port) &&
		(e.Service == nil || !slices.Contains(f.Ports, e.Service.PortNumber)) {
		return false
	}
	if len(f.Protocols) > 0 && !slices.ContainsFunc(f.Protocols, func(p string) bool { return strings.EqualFold(p, e.Protocol) }) {
		return false
	}
	return true
}

// TraceQuery is one /trace request.
//
// +kubebuilder:object:generate=false
type TraceQuery struct {
	TraceFilter
	// Follow keeps the stream open for new events after the history.
	Follow bool
	// Last is how many matching events of the history to send first
	// (0: none when following, the whole ring otherwise).
	Last int
	// Since limits the history to events at or after it (zero: no limit).
	// It applies to the history only: a followed event is always newer.
	Since time.Time
}

// The query parameters of /trace. Each may repeat, or list values
// separated by commas.
const (
	TraceParamFollow    = "follow"
	TraceParamLast      = "last"
	TraceParamNamespace = "namespace"
	TraceParamPod       = "pod"
	TraceParamFromPod   = "from-pod"
	TraceParamToPod     = "to-pod"
	TraceParamNode      = "node"
	TraceParamType      = "type"
	TraceParamVerdict   = "verdict"
	TraceParamPort      = "port"
	TraceParamProtocol  = "protocol"
	// TraceParamSince is an RFC 3339 time (nanoseconds allowed): the
	// client turns `--since 5m` into the time, so every node cuts at the
	// same instant whatever its clock's idea of "5 minutes ago".
	TraceParamSince = "since"
)

// ParseTraceQuery reads a /trace query. Unknown parameters, unknown types and
// verdicts and malformed values are errors: a filter the agent silently
// ignored would show events the user asked not to see.
func ParseTraceQuery(v url.Values) (TraceQuery, error) {
	var q TraceQuery
	for k := range v {
		switch k {
		case TraceParamFollow, TraceParamLast, TraceParamNamespace, TraceParamPod, TraceParamFromPod, TraceParamToPod, TraceParamNode,
			TraceParamType, TraceParamVerdict, TraceParamPort, TraceParamProtocol, TraceParamSince:
		default:
			return TraceQuery{}, fmt.Errorf("unknown parameter %q", k)
		}
	}
	var err error
	if q.Follow, err = traceBool(v, TraceParamFollow); err != nil {
		return TraceQuery{}, err
	}
	if s := traceSingle(v, TraceParamLast); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > TraceMaxLast {
			return TraceQuery{}, fmt.Errorf("%s=%q: want a count from 0 to %d", TraceParamLast, s, TraceMaxLast)
		}
		q.Last = n
	}
	if s := traceSingle(v, TraceParamSince); s != "" {
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return TraceQuery{}, fmt.Errorf("%s=%q: want an RFC 3339 time", TraceParamSince, s)
		}
		q.Since = t.UTC()
	}
	q.Namespaces, err = traceNames(v, TraceParamNamespace, traceValidName)
	if err != nil {
		return TraceQuery{}, err
	}
	for _, p := range []struct {
		param string
		dst   *[]TracePodRef
	}{{TraceParamPod, &q.Pods}, {TraceParamFromPod, &q.FromPods}, {TraceParamToPod, &q.ToPods}} {
		refs, err := traceNames(v, p.param, traceValidPodRef)
		if err != nil {
			return TraceQuery{}, err
		}
		for _, r := range refs {
			ns, name, ok := strings.Cut(r, "/")
			if !ok {
				ns, name = "", r
			}
			*p.dst = append(*p.dst, TracePodRef{Namespace: ns, Name: name})
		}
	}
	if q.Nodes, err = traceNames(v, TraceParamNode, traceValidName); err != nil {
		return TraceQuery{}, err
	}
	if q.Types, err = traceNames(v, TraceParamType, traceOneOf(TraceTypes)); err != nil {
		return TraceQuery{}, err
	}
	if q.Verdicts, err = traceNames(v, TraceParamVerdict, traceOneOf(TraceVerdicts)); err != nil {
		return TraceQuery{}, err
	}
	ports, err := traceNames(v, TraceParamPort, traceValidPort)
	if err != nil {
		return TraceQuery{}, err
	}
	for _, p := range ports {
		n, _ := strconv.ParseUint(p, 10, 16)
		q.Ports = append(q.Ports, uint16(n))
	}
	if q.Protocols, err = traceNames(v, TraceParamProtocol, traceValidName); err != nil {
		return TraceQuery{}, err
	}
	return q, nil
}

// Encode is the query string ParseTraceQuery reads back as q (the client side).
func (q TraceQuery) Encode() string {
	v := url.Values{}
	if q.Follow {
		v.Set(TraceParamFollow, "1")
	}
	if q.Last > 0 {
		v.Set(TraceParamLast, strconv.Itoa(q.Last))
	}
	if !q.Since.IsZero() {
		v.Set(TraceParamSince, q.Since.UTC().Format(time.RFC3339Nano))
	}
	add := func(k string, vals []string) {
		for _, s := range vals {
			v.Add(k, s)
		}
	}
	refs := func(rs []TracePodRef) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.String())
		}
		return out
	}
	add(TraceParamNamespace, q.Namespaces)
	add(TraceParamPod, refs(q.Pods))
	add(TraceParamFromPod, refs(q.FromPods))
	add(TraceParamToPod, refs(q.ToPods))
	add(TraceParamNode, q.Nodes)
	add(TraceParamType, q.Types)
	add(TraceParamVerdict, q.Verdicts)
	for _, p := range q.Ports {
		v.Add(TraceParamPort, strconv.Itoa(int(p)))
	}
	add(TraceParamProtocol, q.Protocols)
	return v.Encode()
}

func traceSingle(v url.Values, k string) string {
	if vs := v[k]; len(vs) > 0 {
		return vs[len(vs)-1]
	}
	return ""
}

func traceBool(v url.Values, k string) (bool, error) {
	switch s := traceSingle(v, k); s {
	case "", "0", "false":
		return false, nil
	case "1", "true":
		return true, nil
	default:
		return false, fmt.Errorf("%s=%q: want 1 or 0", k, s)
	}
}

// names splits every value of k on commas, checks each with valid and
// drops duplicates.
func traceNames(v url.Values, k string, valid func(string) error) ([]string, error) {
	var out []string
	for _, raw := range v[k] {
		for s := range strings.SplitSeq(raw, ",") {
			if err := valid(s); err != nil {
				return nil, fmt.Errorf("%s=%q: %w", k, s, err)
			}
			if !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out, nil
}

// traceValidName accepts what can be a Kubernetes object name (DNS-1123
// subdomain characters); the filter only compares, so this is a sanity
// bound, not the API server's validation.
func traceValidName(s string) error {
	if s == "" || len(s) > 253 {
		return fmt.Errorf("want 1 to 253 characters")
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_') {
			return fmt.Errorf("character %q not allowed", c)
		}
	}
	return nil
}

func traceValidPodRef(s string) error {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return traceValidName(s)
	}
	if err := traceValidName(ns); err != nil {
		return fmt.Errorf("namespace: %w", err)
	}
	if err := traceValidName(name); err != nil {
		return fmt.Errorf("name: %w", err)
	}
	return nil
}

func traceValidPort(s string) error {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != s {
		return fmt.Errorf("want a port from 1 to 65535")
	}
	return nil
}

func traceOneOf(known []string) func(string) error {
	return func(s string) error {
		if !slices.Contains(known, s) {
			return fmt.Errorf("want one of %s", strings.Join(known, ", "))
		}
		return nil
	}
}
