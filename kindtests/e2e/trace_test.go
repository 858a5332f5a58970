package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// The trace suite: the truth-table pods (x, y, z with a, b, c), one policy
// in x admitting x/a's port 80 from x/b only and one denying z's egress;
// real connections, then `kubectl ebpf trace` through kubectl's plugin
// lookup, port-forwarding to the real agent.

// traceFlow is a connection the suite makes and the events it must produce.
type traceFlow struct {
	from, to npPod
	allowed  bool
	// direction, reason and policy (ns/name) of the deciding side's event.
	direction, reason, policy string
	rule                      *int
}

func ptrInt(i int) *int { return &i }

// portIs is what --port matches: either end's port, or the Service port a
// connect() addressed.
func portIs(e apiv1.TraceEvent, p uint16) bool {
	return e.Source.Port == p || e.Destination.Port == p || (e.Service != nil && e.Service.PortNumber == p)
}

// traceEvents runs `kubectl ebpf trace -o json args...` and decodes its
// lines; exit 0 or 3 (losses) are both a trace.
func traceEvents(t *testing.T, args ...string) ([]apiv1.TraceEvent, []apiv1.TraceLost) {
	t.Helper()
	r := kubectlQuiet(t, time.Minute, append([]string{"ebpf", "trace", "-o", "json"}, args...)...)
	if r.code != 0 && r.code != 3 {
		t.Fatalf("kubectl ebpf trace %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	var events []apiv1.TraceEvent
	var lost []apiv1.TraceLost
	for _, row := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		if row == "" {
			continue
		}
		var l apiv1.TraceLine
		if err := json.Unmarshal([]byte(row), &l); err != nil {
			t.Fatalf("trace line %q: %v", row, err)
		}
		switch {
		case l.Event != nil:
			events = append(events, *l.Event)
		case l.Lost != nil:
			lost = append(lost, *l.Lost)
		default:
			t.Fatalf("trace line with neither event nor lost: %q", row)
		}
	}
	if r.code == 3 && len(lost) == 0 {
		t.Errorf("trace exit 3 without a lost notice: %s", r.stderr)
	}
	return events, lost
}

func peerIs(p apiv1.TracePeer, pod npPod) bool {
	return p.Namespace == npNS(pod.ns) && p.Pod == pod.name
}

// findFlow is the event of f among events (nil if none).
func findFlow(events []apiv1.TraceEvent, f traceFlow) *apiv1.TraceEvent {
	for i := range events {
		e := &events[i]
		if e.Type == apiv1.TraceTypePolicy && peerIs(e.Source, f.from) && peerIs(e.Destination, f.to) && e.Destination.Port == 80 &&
			e.Direction == f.direction {
			return e
		}
	}
	return nil
}

// checkFlowEvent: f's event is there with the right verdict and names.
func checkFlowEvent(t *testing.T, events []apiv1.TraceEvent, f traceFlow) {
	t.Helper()
	e := findFlow(events, f)
	if e == nil {
		t.Errorf("no %s event of %s -> %s:80 among %d events", f.direction, f.from, f.to, len(events))
		return
	}
	wantVerdict := apiv1.TraceVerdictDenied
	if f.allowed {
		wantVerdict = apiv1.TraceVerdictAllowed
	}
	var got string
	if e.Policy != nil {
		got = e.Policy.Namespace + "/" + e.Policy.Name
	}
	if e.Verdict != wantVerdict || e.Reason != f.reason || got != f.policy || e.Protocol != "TCP" || e.Node == "" {
		t.Errorf("%s -> %s: event %+v policy %+v; want verdict %s, reason %s, policy %q", f.from, f.to, *e, e.Policy, wantVerdict, f.reason, f.policy)
	}
	if f.rule != nil && (e.Policy == nil || e.Policy.Rule == nil || *e.Policy.Rule != *f.rule) {
		t.Errorf("%s -> %s: rule %+v, want %d", f.from, f.to, e.Policy, *f.rule)
	}
	if f.reason == apiv1.TraceReasonDefaultDeny && !strings.Contains(e.Message, "default deny of NetworkPolicy "+f.policy) {
		t.Errorf("%s -> %s: message %q does not say whose default deny", f.from, f.to, e.Message)
	}
}

// connect makes one TCP connection attempt from -> to:80 and checks it
// went as the policy says.
func connect(t *testing.T, ips map[npPod]string, f traceFlow) {
	t.Helper()
	r := kubectlQuiet(t, time.Minute, "-n", npNS(f.from.ns), "exec", f.from.name, "--", "/usr/local/bin/kebpf-testserver", "probe",
		"--to", ips[f.to]+":80", "--timeout", "1s")
	res, err := decodeNProbes(r, 1)
	if err != nil {
		t.Fatalf("probe %s -> %s: %v", f.from, f.to, err)
	}
	if res[0].OK != f.allowed {
		t.Fatalf("probe %s -> %s: ok=%v, want %v: %+v", f.from, f.to, res[0].OK, f.allowed, res[0])
	}
}

func TestIntegrationTrace(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		for _, ns := range npNamespaces {
			kubectl(t, 2*time.Minute, "delete", "namespace", npNS(ns), "--wait=true", "--ignore-not-found")
		}
		ensureUninstalled(t)
	})
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m", "--enable", "policy")
	kubectlStdin(t, npWorkloads(), "apply", "-f", "-")
	for _, ns := range npNamespaces {
		mustKubectl(t, 3*time.Minute, "-n", npNS(ns), "wait", "--for=condition=Ready", "pod", "--all", "--timeout=150s")
	}
	ips := npIPs(t)
	kubectlStdin(t, policy("x", "a-from-b\n  podSelector: {matchLabels: {pod: \"a\"}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: \"b\"}}}]\n    ports: [{port: 80}]\n")+
		policy("z", "deny-egress\n  podSelector: {}\n  policyTypes: [Egress]\n"), "apply", "-f", "-")
	time.Sleep(time.Second) // the informer round trip

	allowed := traceFlow{from: npPod{"x", "b"}, to: npPod{"x", "a"}, allowed: true, direction: "ingress",
		reason: apiv1.TraceReasonPolicy, policy: npNS("x") + "/a-from-b", rule: ptrInt(0)}
	deniedIn := traceFlow{from: npPod{"y", "c"}, to: npPod{"x", "a"}, direction: "ingress",
		reason: apiv1.TraceReasonDefaultDeny, policy: npNS("x") + "/a-from-b"}
	deniedOut := traceFlow{from: npPod{"z", "b"}, to: npPod{"y", "a"}, direction: "egress",
		reason: apiv1.TraceReasonDefaultDeny, policy: npNS("z") + "/deny-egress"}
	start := time.Now()
	for _, f := range []traceFlow{allowed, deniedIn, deniedOut} {
		connect(t, ips, f)
	}

	t.Run("events name pods, policies and verdicts", func(t *testing.T) {
		events, lost := traceEvents(t, "-A", "--since", "5m")
		if len(lost) > 0 {
			t.Errorf("lost notices in a quiet cluster: %+v", lost)
		}
		for _, f := range []traceFlow{allowed, deniedIn, deniedOut} {
			checkFlowEvent(t, events, f)
		}
		for _, e := range events {
			if e.Time.Before(start.Add(-5 * time.Minute)) {
				t.Errorf("--since 5m gave an event of %v", e.Time)
			}
		}
		// The table names the policy too.
		r := kubectl(t, time.Minute, "ebpf", "trace", "-A", "--from-pod", npNS("y")+"/c", "--to-pod", npNS("x")+"/a", "--verdict", "denied")
		if r.code != 0 || !strings.Contains(r.stdout, "ingress: default deny of "+npNS("x")+"/a-from-b") {
			t.Errorf("table: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("filters narrow", func(t *testing.T) {
		for _, c := range []struct {
			args    []string
			want    []traceFlow // must be there
			notWant []traceFlow // must not
			every   func(e apiv1.TraceEvent) bool
		}{
			{[]string{"-A", "--from-pod", npNS("y") + "/c"}, []traceFlow{deniedIn}, []traceFlow{allowed, deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Source.Namespace == npNS("y") && e.Source.Pod == "c" }},
			{[]string{"-n", npNS("y"), "--from-pod", "c"}, []traceFlow{deniedIn}, []traceFlow{allowed, deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Source.Namespace == npNS("y") && e.Source.Pod == "c" }},
			{[]string{"-A", "--to-pod", npNS("x") + "/a"}, []traceFlow{allowed, deniedIn}, []traceFlow{deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Destination.Namespace == npNS("x") && e.Destination.Pod == "a" }},
			{[]string{"-A", "--verdict", "denied"}, []traceFlow{deniedIn, deniedOut}, []traceFlow{allowed},
				func(e apiv1.TraceEvent) bool { return e.Verdict == apiv1.TraceVerdictDenied }},
			{[]string{"-A", "--verdict", "allowed"}, []traceFlow{allowed}, []traceFlow{deniedIn, deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Verdict == apiv1.TraceVerdictAllowed }},
			{[]string{"-A", "--type", "policy"}, []traceFlow{allowed, deniedIn, deniedOut}, nil,
				func(e apiv1.TraceEvent) bool { return e.Type == apiv1.TraceTypePolicy }},
			{[]string{"-A", "--type", "lb"}, nil, []traceFlow{allowed, deniedIn, deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Type == apiv1.TraceTypeLB }},
			{[]string{"-A", "--port", "80"}, []traceFlow{allowed, deniedIn, deniedOut}, nil,
				func(e apiv1.TraceEvent) bool { return portIs(e, 80) }},
			{[]string{"-A", "--port", "81"}, nil, []traceFlow{allowed, deniedIn, deniedOut},
				func(e apiv1.TraceEvent) bool { return portIs(e, 81) }},
			{[]string{"-n", npNS("z")}, []traceFlow{deniedOut}, []traceFlow{allowed, deniedIn},
				func(e apiv1.TraceEvent) bool {
					return e.Source.Namespace == npNS("z") || e.Destination.Namespace == npNS("z")
				}},
			{[]string{"-A", "--protocol", "udp"}, nil, []traceFlow{allowed, deniedIn, deniedOut},
				func(e apiv1.TraceEvent) bool { return e.Protocol == "UDP" }},
			{[]string{"-A", "--node", env.Cluster.Nodes[0], "--verdict", "denied"}, []traceFlow{deniedIn}, []traceFlow{allowed},
				func(e apiv1.TraceEvent) bool {
					return e.Node == env.Cluster.Nodes[0] && e.Verdict == apiv1.TraceVerdictDenied
				}},
		} {
			events, _ := traceEvents(t, c.args...)
			t.Logf("trace %s: %d events", strings.Join(c.args, " "), len(events))
			for _, e := range events {
				if !c.every(e) {
					t.Errorf("trace %s: event outside the filter: %+v", strings.Join(c.args, " "), e)
				}
			}
			for _, f := range c.want {
				if findFlow(events, f) == nil {
					t.Errorf("trace %s: lacks %s -> %s", strings.Join(c.args, " "), f.from, f.to)
				}
			}
			for _, f := range c.notWant {
				if findFlow(events, f) != nil {
					t.Errorf("trace %s: has %s -> %s", strings.Join(c.args, " "), f.from, f.to)
				}
			}
		}
		// --last 1 of all nodes: exactly one event, the newest.
		all, _ := traceEvents(t, "-A")
		last, _ := traceEvents(t, "-A", "--last", "1")
		if len(last) != 1 || len(all) == 0 || !last[0].Time.Equal(all[len(all)-1].Time) {
			t.Errorf("--last 1: %+v (of %d)", last, len(all))
		}
	})

	t.Run("follow delivers within a second", func(t *testing.T) {
		f := startFollow(t, "-A", "--from-pod", npNS("y")+"/c", "--verdict", "denied")
		// Give the plugin time to find the agents and open the streams:
		// the measure is from the connection attempt, not from launch.
		time.Sleep(3 * time.Second)
		probeStart := time.Now()
		connect(t, ips, deniedIn)
		r := f.next(t, 10*time.Second, func(e apiv1.TraceEvent) bool { return !e.Time.Before(probeStart.Add(-time.Second)) })
		lat := r.at.Sub(r.e.Time)
		t.Logf("trace -f: event of the connect() at %s printed %v after the datapath's time stamp (%v after the probe's exec began, %v after launch)",
			r.e.Time.Format(time.RFC3339Nano), lat, r.at.Sub(probeStart), r.at.Sub(f.launched))
		if lat > time.Second {
			t.Errorf("trace -f: event printed %v after it happened, want within a second", lat)
		}
		if !peerIs(r.e.Source, deniedIn.from) || r.e.Verdict != apiv1.TraceVerdictDenied {
			t.Errorf("trace -f: unexpected event %+v", r.e)
		}
	})

	t.Run("a restarted agent names the policy of the same flow", func(t *testing.T) {
		node := env.Cluster.Nodes[0]
		// The agent's state file (nodeagent/netpol.IDs) on the node's /run.
		readIDs := func() map[string]uint32 {
			t.Helper()
			out, err := onNode(t, node, "cat", "/run/kubectl-ebpf/state/policy-ids.json")
			if err != nil {
				t.Fatalf("policy-ids.json on %s: %v: %s", node, err, out)
			}
			var f struct {
				Policies map[string]uint32 `json:"policies"`
			}
			mustJSON(t, "policy-ids.json", out, &f)
			t.Logf("policy-ids.json: %s", strings.TrimSpace(out))
			return f.Policies
		}
		name := npNS("x") + "/a-from-b"
		before := readIDs()
		if before[name] == 0 {
			t.Fatalf("policy-ids.json does not name %s", name)
		}
		ds := []string{"-n", manifests.Namespace}
		old := strings.TrimSpace(mustKubectl(t, time.Minute, append(ds, "get", "pods", "-l", manifests.AgentSelector, "--field-selector", "spec.nodeName="+node, "-o", "jsonpath={.items[0].metadata.name}")...))
		// A follow open across the restart.
		follow := startFollow(t, "-A", "--from-pod", npNS("y")+"/c", "--verdict", "denied")
		time.Sleep(3 * time.Second)
		mustKubectl(t, 2*time.Minute, append(ds, "delete", "pod", old, "--wait=true")...)
		// A denied flow right after the old agent went: the pinned
		// datapath still enforces, and the event waits in the pinned ring
		// buffer for the next agent (or reaches it, if it is already up).
		gap := time.Now()
		connect(t, ips, deniedIn)
		mustKubectl(t, 3*time.Minute, append(ds, "rollout", "status", "ds", manifests.DaemonSetName, "--timeout=150s")...)
		mustKubectl(t, 4*time.Minute, "ebpf", "status", "--wait", "--timeout", "3m")
		started := strings.TrimSpace(mustKubectl(t, time.Minute, append(ds, "get", "pods", "-l", manifests.AgentSelector, "--field-selector", "spec.nodeName="+node,
			"-o", "jsonpath={.items[0].status.containerStatuses[0].state.running.startedAt}")...))
		r := follow.next(t, 30*time.Second, func(e apiv1.TraceEvent) bool { return !e.Time.Before(gap.Add(-time.Second)) })
		if p := r.e.Policy; r.e.Reason != apiv1.TraceReasonDefaultDeny || p == nil || p.Namespace+"/"+p.Name != name {
			t.Errorf("trace -f across the restart: %+v policy %+v, want the default deny of %s", r.e, r.e.Policy, name)
		}
		t.Logf("trace -f across the restart: the flow made at %s (new agent's container started %s) arrived %v after it happened: %s",
			gap.Format(time.RFC3339Nano), started, r.at.Sub(r.e.Time), follow.stderr())
		// The new agent took the mapping over: same policy, same ID (the
		// ID the pinned maps still hold).
		if after := readIDs(); after[name] != before[name] {
			t.Errorf("policy %s has ID %d after the restart, %d before", name, after[name], before[name])
		}
		// The new agent's history is its own: the flow again.
		restarted := time.Now()
		connect(t, ips, deniedIn)
		connect(t, ips, allowed)
		var events []apiv1.TraceEvent
		for try := 0; try < 5; try++ {
			events, _ = traceEvents(t, "-A", "--to-pod", npNS("x")+"/a")
			if findFlow(events, deniedIn) != nil && findFlow(events, allowed) != nil {
				break
			}
			time.Sleep(time.Second)
		}
		for _, e := range events {
			if e.Time.Before(restarted.Add(-time.Minute)) {
				t.Logf("note: an event from before the restart: %+v", e)
			}
		}
		checkFlowEvent(t, events, deniedIn)
		checkFlowEvent(t, events, allowed)

		// With no agent at all for a while (parked on no node, as the
		// netpol suite does): the pinned datapath still denies, its event
		// waits in the pinned ring buffer, and the next agent delivers it
		// to the follow, named.
		mustKubectl(t, time.Minute, append(ds, "patch", "ds", manifests.DaemonSetName, "--type", "merge", "-p",
			`{"spec":{"template":{"spec":{"nodeSelector":{"kebpf-test/parked":"yes"}}}}}`)...)
		unpark := func() {
			kubectl(t, time.Minute, append(ds, "patch", "ds", manifests.DaemonSetName, "--type", "merge", "-p",
				`{"spec":{"template":{"spec":{"nodeSelector":null}}}}`)...)
		}
		t.Cleanup(unpark)
		mustKubectl(t, 2*time.Minute, append(ds, "wait", "--for=delete", "pod", "-l", manifests.AgentSelector, "--timeout=90s")...)
		away := time.Now()
		connect(t, ips, deniedIn)
		time.Sleep(2 * time.Second) // surely before any agent is back
		unpark()
		mustKubectl(t, 3*time.Minute, append(ds, "rollout", "status", "ds", manifests.DaemonSetName, "--timeout=150s")...)
		r = follow.next(t, 60*time.Second, func(e apiv1.TraceEvent) bool { return !e.Time.Before(away) })
		if p := r.e.Policy; r.e.Reason != apiv1.TraceReasonDefaultDeny || p == nil || p.Namespace+"/"+p.Name != name ||
			!peerIs(r.e.Source, deniedIn.from) || !peerIs(r.e.Destination, deniedIn.to) {
			t.Errorf("trace -f, flow made with no agent: %+v policy %+v, want y/c -> x/a named, default deny of %s", r.e, r.e.Policy, name)
		}
		t.Logf("trace -f: the flow made at %s with no agent running arrived %v after it happened, from the next agent", r.e.Time.Format(time.RFC3339Nano), r.at.Sub(r.e.Time))
	})

	t.Run("trace policy explains the pairs", func(t *testing.T) {
		r := kubectl(t, time.Minute, "ebpf", "trace", "policy", "--from", deniedIn.from.String2(), "--to", deniedIn.to.String2(), "--port", "80")
		if strings.Contains(r.stderr, "has no /explain") {
			t.Skip("the agent has no /explain handler in this tree yet")
		}
		if r.code != 1 || !strings.Contains(r.stdout, "DENIED") || !strings.Contains(r.stdout, "default deny of "+npNS("x")+"/a-from-b") {
			t.Errorf("denied pair: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		r = kubectl(t, time.Minute, "ebpf", "trace", "policy", "--from", allowed.from.String2(), "--to", allowed.to.String2(), "--port", "80")
		if r.code != 0 || !strings.Contains(r.stdout, "ALLOWED") || !strings.Contains(r.stdout, npNS("x")+"/a-from-b") {
			t.Errorf("allowed pair: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		r = kubectl(t, time.Minute, "ebpf", "trace", "policy", "--from", deniedOut.from.String2(), "--to", deniedOut.to.String2(), "--port", "80")
		if r.code != 1 || !strings.Contains(r.stdout, "default deny of "+npNS("z")+"/deny-egress") {
			t.Errorf("denied egress: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("without permission: one line naming it", func(t *testing.T) {
		sa := "system:serviceaccount:" + npNS("x") + ":trace-test"
		mustKubectl(t, time.Minute, "-n", npNS("x"), "create", "serviceaccount", "trace-test")
		r := kubectl(t, time.Minute, "ebpf", "trace", "-A", "--as", sa)
		want := "error: permission denied: kubectl ebpf trace needs list pods in kubectl-ebpf-system and create pods/portforward in kubectl-ebpf-system (it reaches each node's agent by a port-forward through the API server)\n"
		if r.code == 0 || r.stderr != want || r.stdout != "" {
			t.Errorf("as %s: exit %d, stdout %q, stderr %q; want exactly %q", sa, r.code, r.stdout, r.stderr, want)
		}
		// With exactly the permissions the README names, it traces.
		kubectlStdin(t, fmt.Sprintf(`apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: kebpf-trace, namespace: %[1]s}
rules:
- {apiGroups: [""], resources: [pods], verbs: [list]}
- {apiGroups: [""], resources: [pods/portforward], verbs: [create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: kebpf-trace-test, namespace: %[1]s}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: kebpf-trace}
subjects: [{kind: ServiceAccount, name: trace-test, namespace: %[2]s}]
`, manifests.Namespace, npNS("x")), "apply", "-f", "-")
		t.Cleanup(func() {
			kubectl(t, time.Minute, "-n", manifests.Namespace, "delete", "rolebinding", "kebpf-trace-test", "--ignore-not-found")
			kubectl(t, time.Minute, "-n", manifests.Namespace, "delete", "role", "kebpf-trace", "--ignore-not-found")
		})
		var ok bool
		for try := 0; try < 5 && !ok; try++ {
			r = kubectl(t, time.Minute, "ebpf", "trace", "-A", "--as", sa, "--to-pod", npNS("x")+"/a", "-o", "json")
			ok = (r.code == 0 || r.code == 3) && strings.Contains(r.stdout, `"name":"a-from-b"`)
			if !ok {
				time.Sleep(time.Second) // RBAC caches catch up
			}
		}
		if !ok {
			t.Errorf("as %s with list pods + create pods/portforward: exit %d\n%s%s", sa, r.code, r.stdout, r.stderr)
		}
	})
}

// follower is a running `kubectl ebpf trace -f -o json`.
type follower struct {
	launched time.Time
	lines    chan followed
	errb     *syncBuilder
}

type followed struct {
	e  apiv1.TraceEvent
	at time.Time // when the test read it
}

type syncBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (f *follower) stderr() string {
	f.errb.mu.Lock()
	defer f.errb.mu.Unlock()
	return f.errb.b.String()
}

// startFollow runs `kubectl ebpf trace -f -o json args...` until the test
// ends (interrupted like a user's ^C).
func startFollow(t *testing.T, args ...string) *follower {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	cmd := exec.CommandContext(ctx, filepath.Join(env.BinDir, "kubectl"), append([]string{"ebpf", "trace", "-f", "-o", "json"}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+env.Cluster.Kubeconfig, "PATH="+env.BinDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	f := &follower{launched: time.Now(), lines: make(chan followed, 64), errb: &syncBuilder{}}
	cmd.Stderr = f.errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		cancel()
	})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var l apiv1.TraceLine
			if json.Unmarshal(sc.Bytes(), &l) == nil && l.Event != nil {
				f.lines <- followed{*l.Event, time.Now()}
			}
		}
		close(f.lines)
	}()
	return f
}

// next is the next followed event that want accepts.
func (f *follower) next(t *testing.T, timeout time.Duration, want func(apiv1.TraceEvent) bool) followed {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case r, ok := <-f.lines:
			if !ok {
				t.Fatalf("trace -f ended; stderr: %s", f.stderr())
			}
			if want(r.e) {
				return r
			}
		case <-deadline:
			t.Fatalf("trace -f: no event within %v; stderr: %s", timeout, f.stderr())
		}
	}
}

// String2 is namespace/name with the suite's real namespace name.
func (p npPod) String2() string { return npNS(p.ns) + "/" + p.name }
