//go:build linux

package trace

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"time"

	"k8s.io/apimachinery/pkg/types"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// ExplainSource is the policy feature's compiled state: the pod cache of its
// sync and the datapath's own maps.
type ExplainSource interface {
	PolicyNamer
	// Pod is a pod's addresses and whether this node enforces for it;
	// false when the sync's cache has no such pod.
	Pod(k types.NamespacedName) (ips []netip.Addr, local, ok bool)
	// SelectedBy lists namespace/name of the policies selecting the pod
	// in dir.
	SelectedBy(k types.NamespacedName, dir dp.Direction) []string
	// Decide answers from the pinned maps the datapath reads.
	Decide(q dp.Question) (dp.Decision, error)
}

// ErrExplainUnavailable wraps why an agent cannot explain now (the policy
// feature is off, or has not finished its first sync): a 503.
var ErrExplainUnavailable = errors.New("policy explanation unavailable")

// ExplainHandler serves GET /explain (apiv1.ExplainPath): the verdict the
// datapath would give a new connection From -> To on Port/Protocol, for the
// side(s) this node judges (Egress when it hosts From, Ingress when it
// hosts To), from the same maps the programs read (dp.Decide). src returns
// the policy feature's state, or an error wrapping ErrExplainUnavailable.
//
// Errors are one line: 400 a bad query, 404 neither pod on this node (or
// not known), 503 unavailable.
func ExplainHandler(node string, src func() (ExplainSource, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := apiv1.ParseExplainQuery(r.URL.Query())
		if err != nil {
			http.Error(w, "explain: "+err.Error(), http.StatusBadRequest)
			return
		}
		s, err := src()
		if err != nil {
			http.Error(w, "explain: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		out, code, err := Explain(node, s, q)
		if err != nil {
			http.Error(w, "explain: "+err.Error(), code)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(out)
	})
}

// Explain computes q's explanation on node; on error it also returns the
// HTTP status that fits.
func Explain(node string, s ExplainSource, q apiv1.ExplainQuery) (apiv1.PolicyExplanation, int, error) {
	from := types.NamespacedName{Namespace: q.From.Namespace, Name: q.From.Name}
	to := types.NamespacedName{Namespace: q.To.Namespace, Name: q.To.Name}
	fromIPs, fromLocal, fromOK := s.Pod(from)
	toIPs, toLocal, toOK := s.Pod(to)
	switch {
	case !fromOK && !toOK:
		return apiv1.PolicyExplanation{}, http.StatusNotFound, fmt.Errorf("pods %s and %s not found", from, to)
	case !fromLocal && !toLocal:
		return apiv1.PolicyExplanation{}, http.StatusNotFound, fmt.Errorf("neither %s nor %s is a pod-network pod on node %s", from, to, node)
	case !fromOK:
		return apiv1.PolicyExplanation{}, http.StatusNotFound, fmt.Errorf("pod %s not found", from)
	case !toOK:
		return apiv1.PolicyExplanation{}, http.StatusNotFound, fmt.Errorf("pod %s not found", to)
	}
	src, dst, ok := samefamily(fromIPs, toIPs)
	if !ok {
		return apiv1.PolicyExplanation{}, http.StatusNotFound, fmt.Errorf("%s %v and %s %v have no addresses of one family", from, fromIPs, to, toIPs)
	}
	proto := map[string]dp.Proto{"TCP": dp.TCP, "UDP": dp.UDP, "SCTP": dp.SCTP}[q.Protocol]
	var out apiv1.PolicyExplanation
	for _, side := range []struct {
		local bool
		dir   dp.Direction
		pod   types.NamespacedName
		dst   **apiv1.PolicyExplanationSide
	}{{fromLocal, dp.Egress, from, &out.Egress}, {toLocal, dp.Ingress, to, &out.Ingress}} {
		if !side.local {
			continue
		}
		d, err := s.Decide(dp.Question{Src: src, Dst: dst, DstPort: q.Port, Proto: proto, Dir: side.dir})
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, dp.ErrNoEndpoint) {
				// Listed as ours but not programmed: its sandbox is still
				// starting, or programming failed (NodeState says why).
				code = http.StatusServiceUnavailable
				err = fmt.Errorf("pod %s has no policy endpoint on node %s yet", side.pod, node)
			}
			return apiv1.PolicyExplanation{}, code, err
		}
		// Named exactly as the trace names the datapath's own event for
		// this flow would be.
		ev := PolicyEvent(dp.Event{PolicyID: d.PolicyID, Rule: d.Rule, Verdict: d.Verdict, Reason: d.Reason,
			Dir: side.dir, Proto: proto, Src: netip.AddrPortFrom(src, 0), Dst: netip.AddrPortFrom(dst, q.Port)},
			node, time.Time{}, s)
		*side.dst = &apiv1.PolicyExplanationSide{
			Node: node, Pod: side.pod.String(), Verdict: ev.Verdict, Reason: ev.Reason, Policy: ev.Policy,
			SelectedBy: s.SelectedBy(side.pod, side.dir),
		}
	}
	out.Verdict = apiv1.TraceVerdictAllowed
	for _, sd := range []*apiv1.PolicyExplanationSide{out.Egress, out.Ingress} {
		if sd != nil && sd.Verdict != apiv1.TraceVerdictAllowed {
			out.Verdict = apiv1.TraceVerdictDenied
		}
	}
	return out, http.StatusOK, nil
}

// samefamily picks the first source and destination address of one family,
// IPv4 first (a dual-stack connection by name goes over either; both are
// programmed alike).
func samefamily(a, b []netip.Addr) (netip.Addr, netip.Addr, bool) {
	for _, want4 := range []bool{true, false} {
		for _, x := range a {
			if x.Unmap().Is4() != want4 {
				continue
			}
			for _, y := range b {
				if y.Unmap().Is4() == want4 {
					return x.Unmap(), y.Unmap(), true
				}
			}
		}
	}
	return netip.Addr{}, netip.Addr{}, false
}
