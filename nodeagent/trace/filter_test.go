package trace

import (
	"net/url"
	"reflect"
	"strings"
	"testing"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// deny is a policy deny from a/client to b/server:80 on node n1.
func deny() apiv1.TraceEvent {
	return apiv1.TraceEvent{
		Node: "n1", Type: apiv1.TraceTypePolicy, Verdict: apiv1.TraceVerdictDenied, Protocol: "TCP",
		Source:      apiv1.TracePeer{Namespace: "a", Pod: "client", IP: "10.0.0.1", Port: 40000},
		Destination: apiv1.TracePeer{Namespace: "b", Pod: "server", IP: "10.0.0.2", Port: 80},
	}
}

func TestFilterMatch(t *testing.T) {
	ext := deny()
	ext.Source = apiv1.TracePeer{IP: "192.0.2.1", Port: 5555}
	for _, tc := range []struct {
		name  string
		query string
		ev    apiv1.TraceEvent
		want  bool
	}{
		{"empty matches all", "", deny(), true},
		{"namespace of source", "namespace=a", deny(), true},
		{"namespace of destination", "namespace=b", deny(), true},
		{"namespace of neither", "namespace=c", deny(), false},
		{"namespace list", "namespace=c,b", deny(), true},
		{"pod either end", "pod=b/server", deny(), true},
		{"pod without namespace", "pod=client", deny(), true},
		{"pod wrong namespace", "pod=b/client", deny(), false},
		{"from-pod source", "from-pod=a/client", deny(), true},
		{"from-pod is not destination", "from-pod=b/server", deny(), false},
		{"to-pod destination", "to-pod=b/server", deny(), true},
		{"to-pod is not source", "to-pod=a/client", deny(), false},
		{"pod never matches an IP-only end", "pod=a/client", ext, false},
		{"node", "node=n1", deny(), true},
		{"other node", "node=n2", deny(), false},
		{"type", "type=policy", deny(), true},
		{"other type", "type=lb", deny(), false},
		{"verdict", "verdict=denied", deny(), true},
		{"other verdict", "verdict=allowed", deny(), false},
		{"verdicts repeated", "verdict=allowed&verdict=denied", deny(), true},
		{"port destination", "port=80", deny(), true},
		{"port source", "port=40000", deny(), true},
		{"other port", "port=81", deny(), false},
		{"protocol any case", "protocol=tcp", deny(), true},
		{"other protocol", "protocol=udp", deny(), false},
		{"kinds AND", "namespace=a&verdict=allowed", deny(), false},
		{"kinds AND all match", "namespace=a&verdict=denied&type=policy&node=n1&to-pod=b/server", deny(), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := url.ParseQuery(tc.query)
			if err != nil {
				t.Fatal(err)
			}
			q, err := ParseQuery(v)
			if err != nil {
				t.Fatalf("ParseQuery(%q): %v", tc.query, err)
			}
			if got := q.Match(&tc.ev); got != tc.want {
				t.Errorf("Match = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestParseQuery(t *testing.T) {
	for _, tc := range []struct {
		name    string
		query   string
		want    Query
		wantErr string
	}{
		{name: "follow", query: "follow=1", want: Query{Follow: true}},
		{name: "follow true", query: "follow=true&last=5", want: Query{Follow: true, Last: 5}},
		{name: "pods", query: "pod=x&from-pod=ns/y", want: Query{Filter: Filter{Pods: []PodRef{{Name: "x"}}, FromPods: []PodRef{{"ns", "y"}}}}},
		{name: "duplicates dropped", query: "type=lb,lb&type=lb", want: Query{Filter: Filter{Types: []string{"lb"}}}},
		{name: "ports", query: "port=53,443", want: Query{Filter: Filter{Ports: []uint16{53, 443}}}},
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
			got, err := ParseQuery(v)
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

// FuzzParseQuery: any query string parses or fails without panicking, and
// what parses survives Encode and ParseQuery unchanged (the client sends
// exactly what the agent applies).
func FuzzParseQuery(f *testing.F) {
	for _, s := range []string{"", "follow=1&last=10", "namespace=a,b&pod=a/x&to-pod=y", "type=policy&verdict=denied",
		"port=80&protocol=TCP&node=n1", "pod=a/b/c", "last=-1", "%zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		q, err := ParseQuery(v)
		if err != nil {
			return
		}
		v2, err := url.ParseQuery(q.Encode())
		if err != nil {
			t.Fatalf("Encode gave an unparsable query %q: %v", q.Encode(), err)
		}
		q2, err := ParseQuery(v2)
		if err != nil {
			t.Fatalf("re-parse of %q: %v", q.Encode(), err)
		}
		if !reflect.DeepEqual(q, q2) {
			t.Fatalf("round trip of %q: %+v != %+v", raw, q, q2)
		}
		e := deny()
		q.Match(&e)
	})
}
