package trace_test

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	. "github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/trace"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmdutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func pod(ns, name, node string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: corev1.PodSpec{NodeName: node},
		Status: corev1.PodStatus{Phase: corev1.PodRunning}}
}

// explainAgent answers /explain like the agent does: the sides of the
// pods it hosts.
func explainAgent(t *testing.T, status int, answer string) *agentServer {
	t.Helper()
	a := &agentServer{}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.queries = append(a.queries, r.URL.Query())
		a.mu.Unlock()
		if r.URL.Path != apiv1.ExplainPath {
			http.NotFound(w, r)
			return
		}
		if _, err := apiv1.ParseExplainQuery(r.URL.Query()); err != nil {
			http.Error(w, "explain: "+err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(status)
		w.Write([]byte(answer))
	}))
	t.Cleanup(a.Close)
	return a
}

const (
	egressNotEnforced  = `{"node":"node-1","pod":"x/b","verdict":"allowed","reason":"not-enforced"}`
	ingressDefaultDeny = `{"node":"node-2","pod":"x/a","verdict":"denied","reason":"default-deny",` +
		`"policy":{"kind":"NetworkPolicy","namespace":"x","name":"a-from-y"},"selectedBy":["x/a-from-y"]}`
	ingressRule = `{"node":"node-2","pod":"x/a","verdict":"allowed","reason":"policy",` +
		`"policy":{"kind":"NetworkPolicy","namespace":"x","name":"a-from-b","rule":0},"selectedBy":["x/a-from-b","x/a-from-y"]}`
)

func runPolicy(t *testing.T, agents map[string]*agentServer, o PolicyOptions) (string, error) {
	t.Helper()
	f := twoNodes(t, pod("x", "a", "node-2"), pod("x", "b", "node-1"))
	var out bytes.Buffer
	o.Conn = kube.Conn{Clients: f.Clients}
	o.IOStreams = genericiooptions.IOStreams{Out: &out, ErrOut: &out}
	o.Dial = dialAgents(agents)
	if o.Protocol == "" {
		o.Protocol = "TCP"
	}
	if err := o.Complete(nil); err != nil {
		return out.String(), err
	}
	if err := o.Validate(); err != nil {
		return out.String(), err
	}
	err := o.Run(t.Context())
	return out.String(), err
}

func TestPolicyCombine(t *testing.T) {
	for _, tc := range []struct {
		name       string
		node1      string // egress side answer of node-1 (hosts x/b)
		node2      string // ingress side answer of node-2 (hosts x/a)
		wantCode   int
		wantOutput []string
	}{
		{name: "denied by the destination's default deny", node1: egressNotEnforced, node2: ingressDefaultDeny, wantCode: PolicyExitDenied,
			wantOutput: []string{
				"x/b -> x/a TCP/80: DENIED",
				"  egress of x/b (node node-1): allowed: not enforced (no policy selects the pod for egress)",
				"  ingress of x/a (node node-2): denied: default deny of x/a-from-y (no ingress rule of the policies selecting the pod allows it)",
				"    selected by: x/a-from-y",
			}},
		{name: "allowed by a rule", node1: egressNotEnforced, node2: ingressRule, wantCode: PolicyExitAllowed,
			wantOutput: []string{
				"x/b -> x/a TCP/80: ALLOWED",
				"  ingress of x/a (node node-2): allowed by x/a-from-b (ingress rule 0)",
				"    selected by: x/a-from-b, x/a-from-y",
			}},
		{name: "egress denied, ingress allowed", wantCode: PolicyExitDenied,
			node1:      `{"node":"node-1","pod":"x/b","verdict":"denied","reason":"default-deny","policy":{"kind":"NetworkPolicy","namespace":"x","name":"b-egress"}}`,
			node2:      ingressRule,
			wantOutput: []string{"x/b -> x/a TCP/80: DENIED", "  egress of x/b (node node-1): denied: default deny of x/b-egress (no egress rule of the policies selecting the pod allows it)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			agents := map[string]*agentServer{
				"node-1": explainAgent(t, 200, `{"verdict":"x","egress":`+tc.node1+`}`),
				"node-2": explainAgent(t, 200, `{"verdict":"x","ingress":`+tc.node2+`}`),
			}
			out, err := runPolicy(t, agents, PolicyOptions{From: "x/b", To: "x/a", Port: 80})
			code := 0
			if err != nil {
				var exit *cmdutil.ExitError
				if !errors.As(err, &exit) {
					t.Fatalf("err %v", err)
				}
				code = exit.Code
			}
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d\n%s", code, tc.wantCode, out)
			}
			for _, w := range tc.wantOutput {
				if !strings.Contains(out, w+"\n") {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			if q := agents["node-1"].queries[0].Encode(); q != "from=x%2Fb&port=80&protocol=TCP&to=x%2Fa" {
				t.Errorf("query %q", q)
			}
		})
	}
}

// TestPolicyErrors: every failure is exit 2 with the agent's line.
func TestPolicyErrors(t *testing.T) {
	ok := explainAgent(t, 200, `{"verdict":"allowed","egress":`+egressNotEnforced+`}`)
	for _, tc := range []struct {
		name   string
		agents map[string]*agentServer
		o      PolicyOptions
		want   string
	}{
		{"policy feature off", map[string]*agentServer{"node-1": ok, "node-2": explainAgent(t, 503, "explain: the policy feature is not enabled\n")},
			PolicyOptions{From: "x/b", To: "x/a", Port: 80}, "node node-2: agent answered 503: explain: the policy feature is not enabled"},
		{"side missing", map[string]*agentServer{"node-1": ok, "node-2": explainAgent(t, 200, `{"verdict":"allowed"}`)},
			PolicyOptions{From: "x/b", To: "x/a", Port: 80}, "node node-2 did not judge the ingress of x/a"},
		{"no handler", map[string]*agentServer{"node-1": ok, "node-2": &agentServer{Server: httptest.NewServer(http.NotFoundHandler())}},
			PolicyOptions{From: "x/b", To: "x/a", Port: 80}, "has no /explain"},
		{"unknown pod", nil, PolicyOptions{From: "x/zz", To: "x/a", Port: 80}, `pod x/zz: pods "zz" not found`},
		{"bad flags", nil, PolicyOptions{From: "b", To: "x/a", Port: 80}, `from="b": want namespace/pod`},
		{"missing flags", nil, PolicyOptions{From: "x/b", To: "x/a"}, "--from, --to and --port are required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runPolicy(t, tc.agents, tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
}

// TestPolicyExitCodes: through the root command, an error is exit 2 with
// one line, a bad flag too.
func TestPolicyExitCodes(t *testing.T) {
	r := testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "trace", "policy", "--from", "x/b", "--to", "x/a")
	if r.Code != PolicyExitError || !strings.Contains(r.Stderr, "--from, --to and --port are required") {
		t.Errorf("missing --port: %s", r)
	}
	r = testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "trace", "policy", "--nope")
	if r.Code != PolicyExitError {
		t.Errorf("unknown flag: %s", r)
	}
}
