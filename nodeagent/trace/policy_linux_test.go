//go:build linux

package trace

import (
	"context"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

type fakeNamer struct {
	policies map[uint32]string
	pods     map[netip.Addr]types.NamespacedName
}

func (f fakeNamer) PolicyName(id uint32) (string, bool) { n, ok := f.policies[id]; return n, ok }
func (f fakeNamer) PodByIP(ip netip.Addr) (types.NamespacedName, bool) {
	k, ok := f.pods[ip.Unmap()]
	return k, ok
}

func TestPolicyEvent(t *testing.T) {
	namer := fakeNamer{
		policies: map[uint32]string{7: "b/deny-all", 9: "b/allow-web"},
		pods: map[netip.Addr]types.NamespacedName{
			netip.MustParseAddr("10.0.0.1"): {Namespace: "a", Name: "client"},
			netip.MustParseAddr("10.0.0.2"): {Namespace: "b", Name: "server"},
		},
	}
	flow := func(v, reason uint8, dir dp.Direction, policy uint32, rule uint16) dp.Event {
		return dp.Event{Verdict: v, Reason: reason, Dir: dir, PolicyID: policy, Rule: rule, Proto: dp.TCP,
			Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.0.0.2:80")}
	}
	rule := func(i int) *int { return &i }
	for _, tc := range []struct {
		name    string
		ev      dp.Event
		verdict string
		reason  string
		policy  *apiv1.TracePolicy
		message string
	}{
		{"default deny names the policy", flow(dp.VerdictDeny, dp.ReasonDefaultDeny, dp.Ingress, 7, dp.RuleNone),
			apiv1.TraceVerdictDenied, apiv1.TraceReasonDefaultDeny,
			&apiv1.TracePolicy{Kind: "NetworkPolicy", Namespace: "b", Name: "deny-all"},
			"default deny of NetworkPolicy b/deny-all selecting b/server for ingress"},
		{"allow names policy and rule", flow(dp.VerdictAllow, dp.ReasonPolicy, dp.Ingress, 9, 2),
			apiv1.TraceVerdictAllowed, apiv1.TraceReasonPolicy,
			&apiv1.TracePolicy{Kind: "NetworkPolicy", Namespace: "b", Name: "allow-web", Rule: rule(2)}, ""},
		{"unknown ID said so", flow(dp.VerdictDeny, dp.ReasonDefaultDeny, dp.Egress, 99, dp.RuleNone),
			apiv1.TraceVerdictDenied, apiv1.TraceReasonDefaultDeny,
			&apiv1.TracePolicy{Kind: "NetworkPolicy", Unknown: true, ID: 99},
			"default deny of NetworkPolicy unknown policy ID 99 selecting a/client for egress"},
		{"not enforced has no policy", flow(dp.VerdictAllow, dp.ReasonNotEnforced, dp.Egress, 0, dp.RuleNone),
			apiv1.TraceVerdictAllowed, apiv1.TraceReasonNotEnforced, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := PolicyEvent(tc.ev, "n1", epoch, namer)
			if got.Verdict != tc.verdict || got.Reason != tc.reason || got.Message != tc.message {
				t.Errorf("verdict %q reason %q message %q", got.Verdict, got.Reason, got.Message)
			}
			if (got.Policy == nil) != (tc.policy == nil) || got.Policy != nil &&
				(got.Policy.Namespace != tc.policy.Namespace || got.Policy.Name != tc.policy.Name ||
					got.Policy.Unknown != tc.policy.Unknown || got.Policy.ID != tc.policy.ID ||
					(got.Policy.Rule == nil) != (tc.policy.Rule == nil) || got.Policy.Rule != nil && *got.Policy.Rule != *tc.policy.Rule) {
				t.Errorf("policy %+v, want %+v", got.Policy, tc.policy)
			}
			if got.Source != (apiv1.TracePeer{Namespace: "a", Pod: "client", IP: "10.0.0.1", Port: 40000}) ||
				got.Destination != (apiv1.TracePeer{Namespace: "b", Pod: "server", IP: "10.0.0.2", Port: 80}) {
				t.Errorf("peers %+v -> %+v", got.Source, got.Destination)
			}
			if got.Protocol != "TCP" || got.Node != "n1" || got.Type != apiv1.TraceTypePolicy || !got.Time.Equal(epoch) {
				t.Errorf("event %+v", got)
			}
		})
	}
}

// The kernel's pinned lost count is a running total: the first read is the
// baseline, growth is announced in the stream.
func TestPollLost(t *testing.T) {
	h, _ := newHub(t, 10, 10)
	sub := h.Subscribe(apiv1.TraceQuery{Follow: true})
	defer sub.Close()
	counts := make(chan uint64, 2)
	counts <- 5
	counts <- 12
	r := ringReader{typ: apiv1.TraceTypePolicy, hub: h, lostEvery: time.Millisecond, log: slog.Default(), lost: func() (uint64, error) {
		select {
		case n := <-counts:
			return n, nil
		default:
			return 12, nil
		}
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.pollLost(ctx, done, 5); close(done) }() // 5: a previous agent's losses
	defer func() { cancel(); <-done }()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	l, ok := sub.Next(wctx)
	if !ok || l.Lost == nil || l.Lost.Reason != apiv1.TraceLostKernel || l.Lost.Count != 7 || l.Lost.Type != apiv1.TraceTypePolicy {
		t.Fatalf("line %+v (%v), want a notice of 7 kernel losses", l.Lost, ok)
	}
}
