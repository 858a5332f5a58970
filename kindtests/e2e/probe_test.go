package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// probeResult is one line of `kebpf-testserver probe`.
type probeResult struct {
	OK       bool   `json:"ok"`
	Reply    string `json:"reply"`
	Error    string `json:"error"`
	Class    string `json:"class"`
	Status   int    `json:"status"`
	Peer     string `json:"peer"`
	Server   string `json:"server"` // dns: the nameserver(s) asked
	Target   string `json:"target"`
	Duration string `json:"duration"`
}

// decodeProbes reads probe output, one result per line. A line that is not
// a result (not JSON, or JSON that is neither a success nor a failure with
// its error) is an error: a "deny" row must never pass on garbage output,
// which would otherwise read as a failed connection.
func decodeProbes(out string) ([]probeResult, error) {
	var res []probeResult
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var p probeResult
		if err := json.Unmarshal(sc.Bytes(), &p); err != nil {
			return res, fmt.Errorf("probe output line %d is not JSON: %w: %q", len(res)+1, err, sc.Text())
		}
		if p.Duration == "" || (!p.OK && p.Error == "") || (p.OK && p.Error != "") {
			return res, fmt.Errorf("probe output line %d is not a probe result: %q", len(res)+1, sc.Text())
		}
		res = append(res, p)
	}
	return res, sc.Err()
}

// decodeNProbes is decodeProbes that also wants exactly n results.
func decodeNProbes(r result, n int) ([]probeResult, error) {
	res, err := decodeProbes(r.stdout)
	if err == nil && len(res) != n {
		err = fmt.Errorf("want %d probe results, got %d", n, len(res))
	}
	if err != nil {
		return res, errors.Join(err, fmt.Errorf("probe exit %d, stderr: %s", r.code, strings.TrimSpace(r.stderr)))
	}
	return res, nil
}

// serverPod is a pod running kebpf-testserver, the one image of every
// workload of the suites.
type serverPod struct {
	name, ns string
	labels   string // body of a YAML flow mapping: `app: web`
	args     string // body of a YAML flow sequence: `serve, --tcp, '80'`
	// hostNetwork runs it in the node's netns; once does not restart it
	// (restartPolicy Never).
	hostNetwork, once bool
	// dnsPolicy is the pod's, ClusterFirst when empty.
	dnsPolicy string
	// node pins the pod to a node (nodeName); empty lets the scheduler pick.
	node string
	// container is more YAML of the container (ports, env, probes),
	// indented by four spaces.
	container string
}

func (p serverPod) yaml() string {
	restart := "Always"
	if p.once {
		restart = "Never"
	}
	dnsPolicy := "ClusterFirst"
	if p.dnsPolicy != "" {
		dnsPolicy = p.dnsPolicy
	}
	nodeName := ""
	if p.node != "" {
		nodeName = "\n  nodeName: " + p.node
	}
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s, labels: {%s}}
spec:%s
  hostNetwork: %v
  dnsPolicy: %s
  restartPolicy: %s
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: %s
    imagePullPolicy: IfNotPresent
    command: [/usr/local/bin/kebpf-testserver]
    args: [%s]
%s`, p.name, p.ns, p.labels, nodeName, p.hostNetwork, dnsPolicy, restart, env.Product.TestServerRef, p.args, p.container)
}

// nodeAt is the i-th node of the cluster, wrapping around, so a suite that
// spreads pods over two nodes still runs (all on one) on a single node.
func nodeAt(i int) string {
	return env.Cluster.Nodes[i%len(env.Cluster.Nodes)]
}

// kubectlJSON runs kubectl (which must succeed) and decodes its stdout into v.
func kubectlJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	mustJSON(t, "kubectl "+strings.Join(args, " "), mustKubectl(t, time.Minute, args...), v)
}

// mustJSON decodes the output of what into v; output that is not JSON fails
// the test.
func mustJSON(t *testing.T, what, out string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("%s: output is not JSON: %v\n%s", what, err, out)
	}
}

// The decoder is what keeps a garbage line from reading as a denied
// connection; it needs no cluster.
func TestDecodeProbes(t *testing.T) {
	ok := `{"ok":true,"reply":"x/a","target":"10.0.0.1:80","duration":"1ms"}`
	denied := `{"ok":false,"error":"i/o timeout","class":"timeout","target":"10.0.0.2:80","duration":"1s"}`
	tests := []struct {
		name    string
		out     string
		n       int
		wantErr bool
	}{
		{"allowed and denied", ok + "\n" + denied + "\n", 2, false},
		{"trailing blank line", ok + "\n\n", 1, false},
		{"not JSON", "error: unable to upgrade connection\n", 1, true},
		{"JSON but no result", `{"kind":"Status"}` + "\n", 1, true},
		{"failure without its error", `{"ok":false,"duration":"1s"}` + "\n", 1, true},
		{"garbage after results", denied + "\nOCI runtime exec failed\n", 1, true},
		{"too few results", denied + "\n", 2, true},
		{"no output", "", 1, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := decodeNProbes(result{stdout: tt.out}, tt.n)
			if (err != nil) != tt.wantErr {
				t.Fatalf("decodeNProbes = %+v, %v; want error %v", res, err, tt.wantErr)
			}
		})
	}
}
