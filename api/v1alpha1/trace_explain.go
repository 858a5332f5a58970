package v1alpha1

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// ExplainQuery is one /explain request: would a connection from pod From
// to pod To on Port/Protocol be allowed, and which policy decides.
//
// +kubebuilder:object:generate=false
type ExplainQuery struct {
	From, To TracePodRef // both with a namespace
	Port     uint16
	Protocol string // TCP, UDP or SCTP
}

// The query parameters of /explain.
const (
	ExplainParamFrom     = "from"
	ExplainParamTo       = "to"
	ExplainParamPort     = "port"
	ExplainParamProtocol = "protocol"
)

// ExplainProtocols are the protocols /explain judges.
var ExplainProtocols = []string{"TCP", "UDP", "SCTP"}

// ParseExplainQuery reads an /explain query; every parameter but protocol
// (default TCP) is required, pods as namespace/name.
func ParseExplainQuery(v url.Values) (ExplainQuery, error) {
	for k := range v {
		switch k {
		case ExplainParamFrom, ExplainParamTo, ExplainParamPort, ExplainParamProtocol:
		default:
			return ExplainQuery{}, fmt.Errorf("unknown parameter %q", k)
		}
	}
	var q ExplainQuery
	for _, p := range []struct {
		param string
		dst   *TracePodRef
	}{{ExplainParamFrom, &q.From}, {ExplainParamTo, &q.To}} {
		s := traceSingle(v, p.param)
		ns, name, ok := strings.Cut(s, "/")
		if !ok || traceValidName(ns) != nil || traceValidName(name) != nil {
			return ExplainQuery{}, fmt.Errorf("%s=%q: want namespace/pod", p.param, s)
		}
		*p.dst = TracePodRef{Namespace: ns, Name: name}
	}
	s := traceSingle(v, ExplainParamPort)
	if err := traceValidPort(s); err != nil {
		return ExplainQuery{}, fmt.Errorf("%s=%q: %w", ExplainParamPort, s, err)
	}
	n, _ := strconv.ParseUint(s, 10, 16)
	q.Port = uint16(n)
	q.Protocol = strings.ToUpper(traceSingle(v, ExplainParamProtocol))
	if q.Protocol == "" {
		q.Protocol = "TCP"
	}
	if err := traceOneOf(ExplainProtocols)(q.Protocol); err != nil {
		return ExplainQuery{}, fmt.Errorf("%s=%q: %w", ExplainParamProtocol, q.Protocol, err)
	}
	return q, nil
}

// Encode is the query string ParseExplainQuery reads back as q.
func (q ExplainQuery) Encode() string {
	v := url.Values{}
	v.Set(ExplainParamFrom, q.From.String())
	v.Set(ExplainParamTo, q.To.String())
	v.Set(ExplainParamPort, strconv.Itoa(int(q.Port)))
	if q.Protocol != "" {
		v.Set(ExplainParamProtocol, q.Protocol)
	}
	return v.Encode()
}
