//go:build linux

package trace

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

type fakeExplain struct {
	fakeNamer
	local map[types.NamespacedName]bool
	asked []dp.Question
	err   error
}

func (f *fakeExplain) Pod(k types.NamespacedName) ([]netip.Addr, bool, bool) {
	for ip, p := range f.pods {
		if p == k {
			return []netip.Addr{netip.MustParseAddr("fd00::1"), ip}, f.local[k], true
		}
	}
	return nil, false, false
}

func (f *fakeExplain) SelectedBy(k types.NamespacedName, dir dp.Direction) []string {
	if k.Name == "server" && dir == dp.Ingress {
		return []string{"b/deny-all"}
	}
	return nil
}

func (f *fakeExplain) Decide(q dp.Question) (dp.Decision, error) {
	f.asked = append(f.asked, q)
	if f.err != nil {
		return dp.Decision{}, f.err
	}
	if q.Dir == dp.Ingress {
		return dp.Decision{Verdict: dp.VerdictDeny, Reason: dp.ReasonDefaultDeny, PolicyID: 7, Rule: dp.RuleNone}, nil
	}
	return dp.Decision{Verdict: dp.VerdictAllow, Reason: dp.ReasonNotEnforced, Rule: dp.RuleNone}, nil
}

// The handler's answers and one-line errors, with a fake compiled state.
func TestExplainHandler(t *testing.T) {
	client, server := types.NamespacedName{Namespace: "a", Name: "client"}, types.NamespacedName{Namespace: "b", Name: "server"}
	src := &fakeExplain{fakeNamer: fakeNamer{
		policies: map[uint32]string{7: "b/deny-all"},
		pods: map[netip.Addr]types.NamespacedName{
			netip.MustParseAddr("10.0.0.1"): client,
			netip.MustParseAddr("10.0.0.2"): server,
		}}, local: map[types.NamespacedName]bool{client: true, server: true}}
	var unavailable error
	h := ExplainHandler("n1", func() (ExplainSource, error) {
		if unavailable != nil {
			return nil, unavailable
		}
		return src, nil
	})
	get := func(q string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, apiv1.ExplainPath+"?"+q, nil))
		return rec.Code, rec.Body.String()
	}
	oneLine := func(what string, code, want int, body string) {
		t.Helper()
		if code != want || !strings.HasPrefix(body, "explain: ") || strings.Count(body, "\n") != 1 {
			t.Errorf("%s: %d %q, want %d and one line", what, code, body, want)
		}
	}

	code, body := get("from=a/client&to=b/server&port=80&protocol=udp")
	var ex apiv1.PolicyExplanation
	if err := json.Unmarshal([]byte(body), &ex); code != 200 || err != nil {
		t.Fatalf("%d %q %v", code, body, err)
	}
	if ex.Verdict != apiv1.TraceVerdictDenied || ex.Egress == nil || ex.Egress.Reason != apiv1.TraceReasonNotEnforced ||
		ex.Egress.Pod != "a/client" || ex.Ingress == nil || ex.Ingress.Reason != apiv1.TraceReasonDefaultDeny ||
		ex.Ingress.Policy == nil || ex.Ingress.Policy.Name != "deny-all" || ex.Ingress.Node != "n1" ||
		fmt.Sprint(ex.Ingress.SelectedBy) != "[b/deny-all]" {
		t.Errorf("explanation %s", body)
	}
	// IPv4 with IPv4 (the fake lists an IPv6 first), the port and protocol asked.
	want := dp.Question{Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), DstPort: 80, Proto: dp.UDP, Dir: dp.Egress}
	if len(src.asked) != 2 || src.asked[0] != want {
		t.Errorf("asked %+v, want first %+v", src.asked, want)
	}

	src.local[client] = false
	code, body = get("from=a/client&to=b/server&port=80")
	ex = apiv1.PolicyExplanation{}
	if json.Unmarshal([]byte(body), &ex); code != 200 || ex.Egress != nil || ex.Ingress == nil {
		t.Errorf("only the ingress side is this node's: %d %s", code, body)
	}
	src.local[server] = false
	code, body = get("from=a/client&to=b/server&port=80")
	oneLine("neither pod here", code, 404, body)
	code, body = get("from=a/nobody&to=b/ghost&port=80")
	oneLine("unknown pods", code, 404, body)
	code, body = get("from=a/client&to=b/server&port=0")
	oneLine("bad port", code, 400, body)
	code, body = get("from=a/client&to=b/server&port=80&protocol=icmp")
	oneLine("bad protocol", code, 400, body)

	src.local[server] = true
	src.err = fmt.Errorf("decide: 10.0.0.2: %w", dp.ErrNoEndpoint)
	code, body = get("from=a/client&to=b/server&port=80")
	oneLine("pod not programmed yet", code, 503, body)

	unavailable = fmt.Errorf("%w: policy feature off", ErrExplainUnavailable)
	code, body = get("from=a/client&to=b/server&port=80")
	oneLine("feature off", code, 503, body)
}
