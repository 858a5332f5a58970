package trace

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// MaxLast caps ?last=: a client cannot ask for more history than any ring
// holds.
const MaxLast = 1 << 20

// PodRef is a [namespace/]name of `--pod`; an empty Namespace matches the
// name in every namespace.
type PodRef struct {
	Namespace, Name string
}

func (p PodRef) String() string {
	if p.Namespace == "" {
		return p.Name
	}
	return p.Namespace + "/" + p.Name
}

func (p PodRef) matches(peer apiv1.TracePeer) bool {
	return peer.Pod != "" && peer.Pod == p.Name && (p.Namespace == "" || p.Namespace == peer.Namespace)
}

// Filter selects events. Kinds combine with AND, the values of one kind
// with OR; an empty kind matches everything.
type Filter struct {
	// Namespaces match an event with either end in one of them.
	Namespaces []string
	// Pods match either end; FromPods the source, ToPods the destination.
	Pods, FromPods, ToPods []PodRef
	Nodes                  []string
	Types                  []string
	Verdicts               []string
	// Ports match either end's port.
	Ports []uint16
	// Protocols match TraceEvent.Protocol, case-insensitively.
	Protocols []string
}

// Match reports whether e passes the filter.
func (f *Filter) Match(e *apiv1.TraceEvent) bool {
	if len(f.Namespaces) > 0 && !slices.Contains(f.Namespaces, e.Source.Namespace) &&
		!slices.Contains(f.Namespaces, e.Destination.Namespace) {
		return false
	}
	if len(f.Pods) > 0 && !slices.ContainsFunc(f.Pods, func(p PodRef) bool {
		return p.matches(e.Source) || p.matches(e.Destination)
	}) {
		return false
	}
	if len(f.FromPods) > 0 && !slices.ContainsFunc(f.FromPods, func(p PodRef) bool { return p.matches(e.Source) }) {
		return false
	}
	if len(f.ToPods) > 0 && !slices.ContainsFunc(f.ToPods, func(p PodRef) bool { return p.matches(e.Destination) }) {
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
	if len(f.Ports) > 0 && !slices.Contains(f.Ports, e.Source.Port) && !slices.Contains(f.Ports, e.Destination.Port) {
		return false
	}
	if len(f.Protocols) > 0 && !slices.ContainsFunc(f.Protocols, func(p string) bool { return strings.EqualFold(p, e.Protocol) }) {
		return false
	}
	return true
}

// Query is one /trace request.
type Query struct {
	Filter
	// Follow keeps the stream open for new events after the history.
	Follow bool
	// Last is how many matching events of the history to send first
	// (0: none when following, the whole ring otherwise).
	Last int
}

// The query parameters of /trace. Each may repeat, or list values
// separated by commas.
const (
	ParamFollow    = "follow"
	ParamLast      = "last"
	ParamNamespace = "namespace"
	ParamPod       = "pod"
	ParamFromPod   = "from-pod"
	ParamToPod     = "to-pod"
	ParamNode      = "node"
	ParamType      = "type"
	ParamVerdict   = "verdict"
	ParamPort      = "port"
	ParamProtocol  = "protocol"
)

// ParseQuery reads a /trace query. Unknown parameters, unknown types and
// verdicts and malformed values are errors: a filter the agent silently
// ignored would show events the user asked not to see.
func ParseQuery(v url.Values) (Query, error) {
	var q Query
	for k := range v {
		switch k {
		case ParamFollow, ParamLast, ParamNamespace, ParamPod, ParamFromPod, ParamToPod, ParamNode,
			ParamType, ParamVerdict, ParamPort, ParamProtocol:
		default:
			return Query{}, fmt.Errorf("unknown parameter %q", k)
		}
	}
	var err error
	if q.Follow, err = parseBool(v, ParamFollow); err != nil {
		return Query{}, err
	}
	if s := single(v, ParamLast); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > MaxLast {
			return Query{}, fmt.Errorf("%s=%q: want a count from 0 to %d", ParamLast, s, MaxLast)
		}
		q.Last = n
	}
	q.Namespaces, err = names(v, ParamNamespace, validName)
	if err != nil {
		return Query{}, err
	}
	for _, p := range []struct {
		param string
		dst   *[]PodRef
	}{{ParamPod, &q.Pods}, {ParamFromPod, &q.FromPods}, {ParamToPod, &q.ToPods}} {
		refs, err := names(v, p.param, validPodRef)
		if err != nil {
			return Query{}, err
		}
		for _, r := range refs {
			ns, name, ok := strings.Cut(r, "/")
			if !ok {
				ns, name = "", r
			}
			*p.dst = append(*p.dst, PodRef{Namespace: ns, Name: name})
		}
	}
	if q.Nodes, err = names(v, ParamNode, validName); err != nil {
		return Query{}, err
	}
	if q.Types, err = names(v, ParamType, oneOf(apiv1.TraceTypes)); err != nil {
		return Query{}, err
	}
	if q.Verdicts, err = names(v, ParamVerdict, oneOf(apiv1.TraceVerdicts)); err != nil {
		return Query{}, err
	}
	ports, err := names(v, ParamPort, validPort)
	if err != nil {
		return Query{}, err
	}
	for _, p := range ports {
		n, _ := strconv.ParseUint(p, 10, 16)
		q.Ports = append(q.Ports, uint16(n))
	}
	if q.Protocols, err = names(v, ParamProtocol, validName); err != nil {
		return Query{}, err
	}
	return q, nil
}

// Encode is the query string ParseQuery reads back as q (the client side).
func (q Query) Encode() string {
	v := url.Values{}
	if q.Follow {
		v.Set(ParamFollow, "1")
	}
	if q.Last > 0 {
		v.Set(ParamLast, strconv.Itoa(q.Last))
	}
	add := func(k string, vals []string) {
		for _, s := range vals {
			v.Add(k, s)
		}
	}
	refs := func(rs []PodRef) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.String())
		}
		return out
	}
	add(ParamNamespace, q.Namespaces)
	add(ParamPod, refs(q.Pods))
	add(ParamFromPod, refs(q.FromPods))
	add(ParamToPod, refs(q.ToPods))
	add(ParamNode, q.Nodes)
	add(ParamType, q.Types)
	add(ParamVerdict, q.Verdicts)
	for _, p := range q.Ports {
		v.Add(ParamPort, strconv.Itoa(int(p)))
	}
	add(ParamProtocol, q.Protocols)
	return v.Encode()
}

func single(v url.Values, k string) string {
	if vs := v[k]; len(vs) > 0 {
		return vs[len(vs)-1]
	}
	return ""
}

func parseBool(v url.Values, k string) (bool, error) {
	switch s := single(v, k); s {
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
func names(v url.Values, k string, valid func(string) error) ([]string, error) {
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

// validName accepts what can be a Kubernetes object name (DNS-1123
// subdomain characters); the filter only compares, so this is a sanity
// bound, not the API server's validation.
func validName(s string) error {
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

func validPodRef(s string) error {
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return validName(s)
	}
	if err := validName(ns); err != nil {
		return fmt.Errorf("namespace: %w", err)
	}
	if err := validName(name); err != nil {
		return fmt.Errorf("name: %w", err)
	}
	return nil
}

func validPort(s string) error {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != s {
		return fmt.Errorf("want a port from 1 to 65535")
	}
	return nil
}

func oneOf(known []string) func(string) error {
	return func(s string) error {
		if !slices.Contains(known, s) {
			return fmt.Errorf("want one of %s", strings.Join(known, ", "))
		}
		return nil
	}
}
