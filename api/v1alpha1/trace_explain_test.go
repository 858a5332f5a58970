package v1alpha1

import (
	"net/url"
	"slices"
	"strings"
	"testing"
)

func TestParseExplainQuery(t *testing.T) {
	q := ExplainQuery{From: TracePodRef{Namespace: "a", Name: "c"}, To: TracePodRef{Namespace: "b", Name: "s"}, Port: 80, Protocol: "UDP"}
	v, _ := url.ParseQuery(q.Encode())
	got, err := ParseExplainQuery(v)
	if err != nil || got != q {
		t.Fatalf("round trip = %+v, %v; want %+v", got, err, q)
	}
	for _, bad := range []string{
		"from=a/c&to=b/s", "from=c&to=b/s&port=80", "from=a/c&to=b/s&port=0",
		"from=a/c&to=b/s&port=80&protocol=ICMP", "from=a/c&to=b/s&port=80&x=1",
	} {
		v, _ := url.ParseQuery(bad)
		if _, err := ParseExplainQuery(v); err == nil {
			t.Errorf("%s: parsed, want an error", bad)
		}
	}
	v, _ = url.ParseQuery("from=a/c&to=b/s&port=80")
	if got, err := ParseExplainQuery(v); err != nil || got.Protocol != "TCP" {
		t.Fatalf("default protocol = %+v, %v; want TCP", got, err)
	}
}

// FuzzParseExplainQuery: what `trace policy`'s flags become (Validate runs
// this parser) survives Encode and the agent's ParseExplainQuery unchanged,
// every accepted query is one the agent can answer (namespace/name pods, a
// port, a judged protocol), and a rejection says which parameter.
func FuzzParseExplainQuery(f *testing.F) {
	for _, s := range []string{"", "from=a/c&to=b/s&port=80", "from=a/c&to=b/s&port=80&protocol=udp",
		"from=a/c&to=b/s&port=65535&protocol=SCTP", "from=a/c&to=b/s&port=65536", "from=a/c/d&to=b/s&port=1",
		"from=a/c&from=x/y&to=b/s&port=1", "from=/c&to=b/&port=1", "port=0x50", "%zz", "from=A/c&to=b/s&port=+80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		q, err := ParseExplainQuery(v)
		if err != nil {
			msg := err.Error()
			named := false
			for _, p := range []string{ExplainParamFrom, ExplainParamTo, ExplainParamPort, ExplainParamProtocol, "unknown parameter"} {
				named = named || strings.Contains(msg, p)
			}
			if !named || strings.Contains(msg, "%!") {
				t.Fatalf("%q: error %q names no parameter", raw, msg)
			}
			return
		}
		if q.Port == 0 || q.From.Namespace == "" || q.From.Name == "" || q.To.Namespace == "" || q.To.Name == "" ||
			!slices.Contains(ExplainProtocols, q.Protocol) {
			t.Fatalf("%q: accepted an unanswerable query %+v", raw, q)
		}
		v2, err := url.ParseQuery(q.Encode())
		if err != nil {
			t.Fatalf("Encode gave an unparsable query %q: %v", q.Encode(), err)
		}
		q2, err := ParseExplainQuery(v2)
		if err != nil {
			t.Fatalf("re-parse of %q: %v", q.Encode(), err)
		}
		if q2 != q {
			t.Fatalf("round trip of %q: %+v != %+v", raw, q, q2)
		}
	})
}
