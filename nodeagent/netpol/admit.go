package netpol

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	dp "github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
)

// Admission: the CNI plugin (nodeagent/cni) calls Admit while the runtime
// creates a pod's sandbox, before any container of the pod runs. The pod's
// IPs are not in the API yet (the kubelet reports them only after the
// sandbox is up), so the plugin's IPs are kept as a hint and used wherever
// the pod's status has none: the pod is compiled as an endpoint, its veth
// attached, and Admit returns. Local peers see the new pod's IP at once
// too. The hint is dropped when the pod's status carries IPs, when the
// pod goes, or on CNI DEL.

// admitPoll is how often Admit looks for a pod the informer has not
// delivered yet (the pod is bound before the kubelet creates its sandbox,
// so this is usually already the case).
const admitPoll = 10 * time.Millisecond

type hint struct {
	uid types.UID // empty: the runtime did not say
	ips []netip.Addr
}

// AdmitResult is what Admit programmed.
type AdmitResult struct {
	Endpoint        uint32
	Ingress, Egress bool
}

type admitWait struct {
	uid  types.UID
	ips  []netip.Addr
	done chan admitOutcome
}

type admitOutcome struct {
	res AdmitResult
	err error
}

// AdmitError is a refusal of Admit with a short machine-readable reason
// (no-ips, not-synced, pod-not-found, not-programmed, cannot-program) for
// the trace; nodeagent/cni reads it through AdmitReason.
type AdmitError struct {
	Reason string
	Err    error
}

func admitErr(reason string, err error) error { return &AdmitError{Reason: reason, Err: err} }

func (e *AdmitError) Error() string       { return e.Err.Error() }
func (e *AdmitError) Unwrap() error       { return e.Err }
func (e *AdmitError) AdmitReason() string { return e.Reason }

// Admit programs the endpoint of pod ns/name (uid may be empty) with these
// IPs and returns once its programs are attached, or ctx ends.
func (s *Syncer) Admit(ctx context.Context, ns, name string, uid types.UID, ips []netip.Addr) (AdmitResult, error) {
	if len(ips) == 0 {
		return AdmitResult{}, admitErr("no-ips", fmt.Errorf("pod %s/%s: no IPs", ns, name))
	}
	select {
	case <-s.synced:
	case <-ctx.Done():
		return AdmitResult{}, admitErr("not-synced", fmt.Errorf("pod %s/%s: policy informers not synced yet: %w", ns, name, ctx.Err()))
	}
	k := types.NamespacedName{Namespace: ns, Name: name}
	var pod *corev1.Pod
	for {
		p, _ := s.podLister.Pods(ns).Get(name)
		if p != nil && (uid == "" || p.UID == uid) && p.Spec.NodeName == s.opts.NodeName {
			pod = p
			break
		}
		select {
		case <-ctx.Done():
			return AdmitResult{}, admitErr("pod-not-found", fmt.Errorf("pod %s/%s (uid %q) bound to node %s not in the API cache: %w", ns, name, uid, s.opts.NodeName, ctx.Err()))
		case <-time.After(admitPoll):
		}
	}
	if pod.Spec.HostNetwork {
		return AdmitResult{}, nil
	}
	ips = slices.Clone(ips)
	w := &admitWait{uid: pod.UID, ips: ips, done: make(chan admitOutcome, 1)}
	s.mu.Lock()
	s.hints[k] = hint{uid: pod.UID, ips: ips}
	s.admits[k] = append(s.admits[k], w)
	s.mu.Unlock()
	defer s.dropWait(k, w)
	// As a pod change, so local pods whose policies name it as a peer are
	// recompiled with its IP too.
	s.tracker.RecordPod(pod, s.withHint(pod))
	s.tracker.RecordRetry([]types.NamespacedName{k})
	s.runner.Request()
	select {
	case out := <-w.done:
		return out.res, out.err
	case <-ctx.Done():
		why := "its interface was not found"
		s.mu.Lock()
		if ps := s.problems[k]; len(ps) > 0 {
			var names []string
			for n := range ps {
				names = append(names, n)
			}
			slices.Sort(names)
			why = strings.Join(names, "; ")
		}
		s.mu.Unlock()
		return AdmitResult{}, admitErr("not-programmed", fmt.Errorf("pod %s/%s not programmed (%s): %w", ns, name, why, ctx.Err()))
	}
}

// Release forgets the hint of a pod whose sandbox is gone.
func (s *Syncer) Release(ns, name string, uid types.UID) {
	k := types.NamespacedName{Namespace: ns, Name: name}
	s.mu.Lock()
	h, ok := s.hints[k]
	if ok && (uid == "" || h.uid == uid) {
		delete(s.hints, k)
	}
	s.mu.Unlock()
	if ok {
		s.tracker.RecordRetry([]types.NamespacedName{k})
		s.runner.Request()
	}
}

func (s *Syncer) dropWait(k types.NamespacedName, w *admitWait) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.admits[k] = slices.DeleteFunc(s.admits[k], func(x *admitWait) bool { return x == w })
	if len(s.admits[k]) == 0 {
		delete(s.admits, k)
	}
}

// withHint returns pod with the CNI's IPs when its status has none yet.
func (s *Syncer) withHint(pod *corev1.Pod) *corev1.Pod {
	if pod == nil || len(pod.Status.PodIPs) > 0 || pod.Status.PodIP != "" {
		return pod
	}
	s.mu.Lock()
	h, ok := s.hints[key(pod)]
	s.mu.Unlock()
	if !ok || h.uid != pod.UID {
		return pod
	}
	q := *pod
	q.Status.PodIPs = nil
	for _, ip := range h.ips {
		q.Status.PodIPs = append(q.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	q.Status.PodIP = h.ips[0].String()
	return &q
}

// finishAdmits answers the Admit calls whose pod the sync just programmed
// (or could not compile); runs on the runner goroutine, after a sync.
func (s *Syncer) finishAdmits(compileFailed map[types.NamespacedName]bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, ws := range s.admits {
		a, ok := s.applied[k]
		var waiting []*admitWait
		for _, w := range ws {
			switch {
			case compileFailed[k]:
				// Programmed fail closed at most: a pod whose policies do
				// not fit does not start as if they did.
				var names []string
				for n := range s.problems[k] {
					names = append(names, n)
				}
				slices.Sort(names)
				w.done <- admitOutcome{err: admitErr("cannot-program", fmt.Errorf("policy for pod %s cannot be programmed: %s", k, strings.Join(names, "; ")))}
			case ok && a.uid == w.uid && containsAll(a.ep.IPs, w.ips):
				w.done <- admitOutcome{res: AdmitResult{Endpoint: a.ep.ID, Ingress: a.ep.IngressEnforced, Egress: a.ep.EgressEnforced}}
			default:
				waiting = append(waiting, w) // not yet: interface retry or a later sync
			}
		}
		if len(waiting) == 0 {
			delete(s.admits, k)
		} else {
			s.admits[k] = waiting
		}
	}
}

// pruneHints drops hints the API has caught up with, or whose pod is gone.
func (s *Syncer) pruneHints() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, h := range s.hints {
		p, _ := s.podLister.Pods(k.Namespace).Get(k.Name)
		if p == nil || p.UID != h.uid || len(PodIPs(p)) > 0 {
			delete(s.hints, k)
		}
	}
}

func containsAll(have, want []netip.Addr) bool {
	for _, w := range want {
		if !slices.Contains(have, w.Unmap()) {
			return false
		}
	}
	return true
}

// endpointLister is implemented by datapaths that keep endpoints across
// agent restarts (bpf/netpol's pinned maps).
type endpointLister interface {
	Endpoints() (map[uint32]dp.EndpointPolicy, error)
}

// adoptPinned runs before the first sync of a restarted agent: each local
// pod takes over the endpoint a previous agent programmed for one of its
// IPs, and endpoints of pods that went away meanwhile are deleted. Without
// it the new agent's fresh IDs would collide with the pinned ones.
func (s *Syncer) adoptPinned() error {
	el, ok := s.opts.Datapath.(endpointLister)
	if !ok {
		return nil
	}
	pinned, err := el.Endpoints()
	if err != nil {
		return fmt.Errorf("read pinned endpoints: %w", err)
	}
	byIP := map[netip.Addr]uint32{}
	var maxID uint32
	for id, ep := range pinned {
		maxID = max(maxID, id)
		for _, ip := range ep.IPs {
			byIP[ip.Unmap()] = id
		}
	}
	s.ids.SkipEndpoints(maxID)
	claimed := map[uint32]bool{}
	for _, p := range s.localPods() {
		p = s.withHint(p)
		if !IsLocalEndpoint(p, s.opts.NodeName) {
			continue
		}
		for _, ip := range PodIPs(p) {
			id, ok := byIP[ip]
			if !ok || claimed[id] {
				continue
			}
			if s.ids.AdoptEndpoint(p.UID, id) {
				claimed[id] = true
				s.applied[key(p)] = applied{uid: p.UID, ep: pinned[id]}
			}
			break
		}
	}
	var errs []error
	for id := range pinned {
		if claimed[id] {
			continue
		}
		if err := s.opts.Datapath.DeleteEndpoint(id); err != nil {
			errs = append(errs, fmt.Errorf("delete stale endpoint %d: %w", id, err))
		}
	}
	if len(pinned) > 0 {
		s.log.Info("took over pinned endpoints", "adopted", len(claimed), "stale", len(pinned)-len(claimed))
	}
	return errors.Join(errs...)
}
