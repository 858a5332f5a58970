package v1alpha1

import (
	"net/url"
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
