package trace

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// For the external tests (run_test.go), which need testutil (and so
// cannot be in this package: testutil imports the root command).
var (
	T0         = t0
	DenyEvent  = denyEvent
	AllowEvent = allowEvent
	LostAt     = lostAt
)

func rule(n int) *int { return &n }

// denyEvent: x/b -> x/a:80 denied at x/a's ingress by the default deny of
// x/deny-all.
func denyEvent() apiv1.TraceEvent {
	return apiv1.TraceEvent{
		Time: t0.Add(1500 * time.Millisecond), Node: "node-1", Type: apiv1.TraceTypePolicy, Verdict: apiv1.TraceVerdictDenied,
		Direction: "ingress", Protocol: "TCP",
		Source:      apiv1.TracePeer{Namespace: "x", Pod: "b", IP: "10.0.0.2", Port: 40000},
		Destination: apiv1.TracePeer{Namespace: "x", Pod: "a", IP: "10.0.0.1", Port: 80},
		Policy:      &apiv1.TracePolicy{Kind: "NetworkPolicy", Namespace: "x", Name: "deny-all"},
		Reason:      apiv1.TraceReasonDefaultDeny,
	}
}

func allowEvent() apiv1.TraceEvent {
	e := denyEvent()
	e.Time = t0.Add(500 * time.Millisecond)
	e.Verdict, e.Reason = apiv1.TraceVerdictAllowed, apiv1.TraceReasonPolicy
	e.Source = apiv1.TracePeer{Namespace: "y", Pod: "c", IP: "10.0.0.3", Port: 41000}
	e.Policy = &apiv1.TracePolicy{Kind: "NetworkPolicy", Namespace: "x", Name: "a-from-y", Rule: rule(1)}
	e.Process = &apiv1.TraceProcess{PID: 4242, Command: "curl"}
	e.Message = "first packet"
	return e
}

func TestInfoText(t *testing.T) {
	lbEvent := apiv1.TraceEvent{Type: apiv1.TraceTypeLB, Verdict: apiv1.TraceVerdictTranslated,
		Service: &apiv1.TraceService{Namespace: "shop", Name: "cart", Port: "http", IP: "10.96.0.10", PortNumber: 80}}
	unnamedPort := lbEvent
	unnamedPort.Service = &apiv1.TraceService{Namespace: "shop", Name: "cart", IP: "10.96.0.10", PortNumber: 8080}
	l7 := apiv1.TraceEvent{Type: apiv1.TraceTypeL7, Verdict: apiv1.TraceVerdictDenied,
		Policy: &apiv1.TracePolicy{Kind: "L7Policy", Namespace: "shop", Name: "read-only", Rule: rule(0)},
		HTTP:   &apiv1.TraceHTTP{Method: "POST", Path: "/cart", Status: 403}}
	unknown := denyEvent()
	unknown.Policy = &apiv1.TracePolicy{Kind: "NetworkPolicy", Unknown: true, ID: 77}
	notEnforced := allowEvent()
	notEnforced.Direction, notEnforced.Reason, notEnforced.Policy = "egress", apiv1.TraceReasonNotEnforced, nil
	for _, tc := range []struct {
		name string
		e    apiv1.TraceEvent
		want string
	}{
		{"default deny", denyEvent(), "ingress: default deny of x/deny-all"},
		{"rule", allowEvent(), "ingress: policy x/a-from-y rule 1"},
		{"unknown policy", unknown, "ingress: default deny of policy id 77 (name unknown)"},
		{"not enforced", notEnforced, "egress: no policy selects the pod"},
		{"service", lbEvent, "service shop/cart:http"},
		{"service unnamed port", unnamedPort, "service shop/cart:8080"},
		{"l7", l7, "l7policy shop/read-only rule 0, HTTP POST /cart 403"},
		{"lb refused", apiv1.TraceEvent{Type: apiv1.TraceTypeLB, Verdict: apiv1.TraceVerdictRefused, Reason: "no-endpoints",
			Service: &apiv1.TraceService{Namespace: "shop", Name: "empty", Port: "http", IP: "10.96.0.11", PortNumber: 80}}, "service shop/empty:http, no-endpoints"},
		{"l7 steered connect", apiv1.TraceEvent{Type: apiv1.TraceTypeL7, Verdict: apiv1.TraceVerdictRedirected}, "to this node's Envoy"},
		{"l7 refused connect", apiv1.TraceEvent{Type: apiv1.TraceTypeL7, Verdict: apiv1.TraceVerdictRefused, Reason: "no-envoy"}, "no-envoy"},
		{"cni refused", apiv1.TraceEvent{Type: apiv1.TraceTypeCNI, Verdict: apiv1.TraceVerdictRefused, Reason: "not-programmed"}, "not-programmed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := infoText(&tc.e); got != tc.want {
				t.Errorf("info %q, want %q", got, tc.want)
			}
		})
	}
}

func TestTablePrinter(t *testing.T) {
	deny, allow := denyEvent(), allowEvent()
	ext := apiv1.TraceEvent{Time: t0, Node: "node-2", Type: apiv1.TraceTypePolicy, Verdict: apiv1.TraceVerdictDenied, Protocol: "UDP",
		Source: apiv1.TracePeer{IP: "fd00::1", Port: 53}, Destination: apiv1.TracePeer{IP: "192.0.2.1"}}
	lines := []apiv1.TraceLine{{Event: &ext}, {Event: &allow}, {Lost: &apiv1.TraceLost{Time: t0, Node: "node-2", Reason: apiv1.TraceLostKernel, Count: 120}}, {Event: &deny}}
	var b bytes.Buffer
	p := newTablePrinter(&b, false, time.UTC)
	p.fit(lines)
	for i := range lines {
		if err := p.Line(&lines[i]); err != nil {
			t.Fatal(err)
		}
	}
	want := `TIME           NODE     TYPE     VERDICT   SOURCE         DESTINATION   PROTO   INFO
10:00:00.000   node-2   policy   denied    [fd00::1]:53   192.0.2.1     UDP     -
10:00:00.500   node-1   policy   allowed   y/c:41000      x/a:80        TCP     ingress: policy x/a-from-y rule 1
node node-2: 120 events lost (kernel-buffer-full)
10:00:01.500   node-1   policy   denied    x/b:40000      x/a:80        TCP     ingress: default deny of x/deny-all
`
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}

	b.Reset()
	p = newTablePrinter(&b, true, time.UTC)
	p.fit(lines[1:2])
	if err := p.Line(&lines[1]); err != nil {
		t.Fatal(err)
	}
	want = `TIME                          NODE     TYPE     VERDICT   SOURCE      DESTINATION   PROTO   PROCESS     INFO                                REASON   MESSAGE
2026-12-06T10:00:00.500000Z   node-1   policy   allowed   y/c:41000   x/a:80        TCP     4242/curl   ingress: policy x/a-from-y rule 1   policy   first packet
`
	if b.String() != want {
		t.Errorf("wide:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestJSONPrinter(t *testing.T) {
	var b bytes.Buffer
	p := &jsonPrinter{enc: json.NewEncoder(&b)}
	deny := denyEvent()
	for _, l := range []apiv1.TraceLine{{Event: &deny}, {Lost: &apiv1.TraceLost{Time: t0, Node: "n", Reason: apiv1.TraceLostSlowClient, Count: 2}}} {
		if err := p.Line(&l); err != nil {
			t.Fatal(err)
		}
	}
	rows := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(rows) != 2 {
		t.Fatalf("%d rows: %q", len(rows), b.String())
	}
	// The stable field names the README documents.
	for _, f := range []string{`"event":{`, `"time":"2026-12-06T10:00:01.5Z"`, `"node":"node-1"`, `"type":"policy"`, `"verdict":"denied"`,
		`"direction":"ingress"`, `"source":{"namespace":"x","pod":"b","ip":"10.0.0.2","port":40000}`, `"protocol":"TCP"`,
		`"policy":{"kind":"NetworkPolicy","namespace":"x","name":"deny-all"}`, `"reason":"default-deny"`} {
		if !strings.Contains(rows[0], f) {
			t.Errorf("event row lacks %s: %s", f, rows[0])
		}
	}
	if want := `{"lost":{"time":"2026-12-06T10:00:00Z","node":"n","reason":"slow-client","count":2}}`; rows[1] != want {
		t.Errorf("lost row %s, want %s", rows[1], want)
	}
}

// TestFlagsToQuery: what the flags send the agents.
func TestFlagsToQuery(t *testing.T) {
	now := t0
	for _, tc := range []struct {
		name     string
		o        Options
		explicit bool // -n given
		want     string
		wantErr  string
	}{
		{name: "default: current namespace", want: "namespace=shop"},
		{name: "-A: every namespace", o: Options{AllNamespaces: true}, want: ""},
		{name: "pod without namespace is in the current one", o: Options{Pods: []string{"web"}}, want: "namespace=shop&pod=shop%2Fweb"},
		{name: "pod without namespace with -A is any", o: Options{AllNamespaces: true, FromPods: []string{"web"}}, want: "from-pod=web"},
		{name: "qualified pod drops the implicit namespace", o: Options{ToPods: []string{"x/a"}}, want: "to-pod=x%2Fa"},
		{name: "qualified pod keeps an explicit -n", o: Options{ToPods: []string{"x/a"}}, explicit: true, want: "namespace=shop&to-pod=x%2Fa"},
		{name: "every filter", o: Options{AllNamespaces: true, Nodes: []string{"n1"}, Types: []string{"policy"}, Verdicts: []string{"denied"},
			Ports: []int{80, 443}, Protocols: []string{"tcp"}, Last: 10, Follow: true, Since: 5 * time.Minute},
			want: "follow=1&last=10&node=n1&port=80&port=443&protocol=TCP&since=2026-12-06T09%3A55%3A00Z&type=policy&verdict=denied"},
		{name: "verdict aliases", o: Options{AllNamespaces: true, Verdicts: []string{"DENY", "dropped", "allow"}}, want: "verdict=denied&verdict=allowed"},
		{name: "icmpv6", o: Options{AllNamespaces: true, Protocols: []string{"icmpv6"}}, want: "protocol=ICMPv6"},
		{name: "bad type", o: Options{Types: []string{"dns"}}, wantErr: `type="dns": want one of lb, policy, cni, l7`},
		{name: "bad verdict", o: Options{Verdicts: []string{"maybe"}}, wantErr: "verdict"},
		{name: "bad port", o: Options{Ports: []int{0}}, wantErr: "--port 0"},
		{name: "bad protocol", o: Options{Protocols: []string{"quic"}}, wantErr: "--protocol"},
		{name: "bad pod", o: Options{Pods: []string{"a/b/c"}}, wantErr: "--pod"},
		{name: "bad pod namespace", o: Options{Pods: []string{"/b"}}, wantErr: "--pod"},
		{name: "negative since", o: Options{Since: -time.Second}, wantErr: "--since"},
		{name: "bad last", o: Options{Last: -1}, wantErr: "--last"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.Namespace, o.ExplicitNamespace = "shop", tc.explicit
			q, err := o.buildQuery(now)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := q.Encode(); got != tc.want {
				t.Errorf("query %q, want %q", got, tc.want)
			}
		})
	}
}
