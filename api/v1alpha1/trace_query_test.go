package v1alpha1

import (
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"
)

// deny is a policy deny from a/client to b/server:80 on node n1.
func traceDeny() TraceEvent {
	return TraceEvent{
		Node: "n1", Type: TraceTypePolicy, Verdict: TraceVerdictDenied, Protocol: "TCP",
		Source:      TracePeer{Namespace: "a", Pod: "client", IP: "10.0.0.1", Port: 40000},
		Destination: TracePeer{Namespace: "b", Pod: "server", IP: "10.0.0.2", Port: 80},
	}
}

func TestTraceFilterMatch(t *testing.T) {
	ext := traceDeny()
	ext.Source = TracePeer{IP: "192.0.2.1", Port: 5555}
	lb := traceDeny()
	lb.Type, lb.Verdict = TraceTypeLB, TraceVerdictTranslated
	lb.Destination.Port = 8080
	lb.Service = &TraceService{Namespace: "b", Name: "web", IP: "10.96.0.10", PortNumber: 80}
	for _, tc := range []struct {
		name  string
		query string
		ev    TraceEvent
		want  bool
	}{
		{"empty matches all", "", traceDeny(), true},
		{"namespace of source", "namespace=a", traceDeny(), true},
		{"namespace of destination", "namespace=b", traceDeny(), true},
		{"namespace of neither", "namespace=c", traceDeny(), false},
		{"namespace list", "namespace=c,b", traceDeny(), true},
		{"pod either end", "pod=b/server", traceDeny(), true},
		{"pod without namespace", "pod=client", traceDeny(), true},
		{"pod wrong namespace", "pod=b/client", traceDeny(), false},
		{"from-pod source", "from-pod=a/client", traceDeny(), true},
		{"from-pod is not destination", "from-pod=b/server", traceDeny(), false},
		{"to-pod destination", "to-pod=b/server", traceDeny(), true},
		{"to-pod is not source", "to-pod=a/client", traceDeny(), false},
		{"pod never matches an IP-only end", "pod=a/client", ext, false},
		{"node", "node=n1", traceDeny(), true},
		{"other node", "node=n2", traceDeny(), false},
		{"type", "type=policy", traceDeny(), true},
		{"other type", "type=lb", traceDeny(), false},
		{"verdict", "verdict=denied", traceDeny(), true},
		{"other verdict", "verdict=allowed", traceDeny(), false},
		{"verdicts repeated", "verdict=allowed&verdict=denied", traceDeny(), true},
		{"port destination", "port=80", traceDeny(), true},
		{"port of the Service dialed", "port=80", lb, true},
		{"port of the backend", "port=8080", lb, true},
		{"port of neither", "port=81", lb, false},
		{"port source", "port=40000", traceDeny(), true},
		{"other port", "port=81", traceDeny(), false},
		{"protocol any case", "protocol=tcp", traceDeny(), true},
		{"other protocol", "protocol=udp", traceDeny(), false},
		{"kinds AND", "namespace=a&verdict=allowed", traceDeny(), false},
		{"kinds AND all match", "namespace=a&verdict=denied&type=policy&node=n1&to-pod=b/server", traceDeny(), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := url.ParseQuery(tc.query)
			if err != nil {
				t.Fatal(err)
			}
			q, err := ParseTraceQuery(v)
			if err != nil {
				t.Fatalf("ParseTraceQuery(%q): %v", tc.query, err)
			}
			if got := q.Match(&tc.ev); got != tc.want {
				t.Errorf("Match = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestParseTraceQuery(t *testing.T) {
	for _, tc := range []struct {
		name    string
		query   string
		want    TraceQuery
		wantErr string
	}{
		{name: "follow", query: "follow=1", want: TraceQuery{Follow: true}},
		{name: "follow true", query: "follow=true&last=5", want: TraceQuery{Follow: true, Last: 5}},
		{name: "pods", query: "pod=x&from-pod=ns/y", want: TraceQuery{TraceFilter: TraceFilter{Pods: []TracePodRef{{Name: "x"}}, FromPods: []TracePodRef{{"ns", "y"}}}}},
		{name: "duplicates dropped", query: "type=lb,lb&type=lb", want: TraceQuery{TraceFilter: TraceFilter{Types: []string{"lb"}}}},
		{name: "ports", query: "port=53,443", want: TraceQuery{TraceFilter: TraceFilter{Ports: []uint16{53, 443}}}},
		{name: "since", query: "since=2026-12-06T10:00:00.5%2B01:00", want: TraceQuery{Since: time.Date(2026, 12, 6, 9, 0, 0, 5e8, time.UTC)}},
		{name: "bad since", query: "since=5m", wantErr: "since"},
		{name: "unknown parameter", query: "namespaces=a", wantErr: `unknown parameter "namespaces"`},
		{name: "bad follow", query: "follow=yes", wantErr: "follow"},
		{name: "negative last", query: "last=-1", wantErr: "last"},
		{name: "huge last", query: "last=99999999", wantErr: "last"},
		{name: "unknown type", query: "type=dns", wantErr: "want one of"},
		{name: "unknown verdict", query: "verdict=DROPPED", wantErr: "want one of"},
		{name: "empty value", query: "namespace=", wantErr: "namespace"},
		{name: "empty list item", query: "namespace=a,", wantErr: "namespace"},
		{name: "bad pod", query: "pod=a/b/c", wantErr: "pod"},
		{name: "port zero", query: "port=0", wantErr: "port"},
		{name: "port too big", query: "port=65536", wantErr: "port"},
		{name: "port leading zero", query: "port=080", wantErr: "port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := url.ParseQuery(tc.query)
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseTraceQuery(v)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzParseTraceQuery: any query string parses or fails without panicking, and
// what parses survives Encode and ParseTraceQuery unchanged (the client sends
// exactly what the agent applies).
func FuzzParseTraceQuery(f *testing.F) {
	for _, s := range []string{"", "follow=1&last=10", "namespace=a,b&pod=a/x&to-pod=y", "type=policy&verdict=denied",
		"port=80&protocol=TCP&node=n1", "since=2026-12-06T10:00:00.123456789-07:00", "pod=a/b/c", "last=-1", "%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		q, err := ParseTraceQuery(v)
		if err != nil {
			return
		}
		v2, err := url.ParseQuery(q.Encode())
		if err != nil {
			t.Fatalf("Encode gave an unparsable query %q: %v", q.Encode(), err)
		}
		q2, err := ParseTraceQuery(v2)
		if err != nil {
			t.Fatalf("re-parse of %q: %v", q.Encode(), err)
		}
		if !reflect.DeepEqual(q, q2) {
			t.Fatalf("round trip of %q: %+v != %+v", raw, q, q2)
		}
		e := traceDeny()
		q.Match(&e)
	})
}
