package trace

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// Dialer opens an HTTP client to one agent pod's loopback port
// (manifests.AgentHealthPort); the URL's host is ignored. close ends the
// connection. The default port-forwards through the API server; tests
// point it at httptest servers.
type Dialer func(ctx context.Context, pod *corev1.Pod) (client *http.Client, close func(), err error)

// portForwardDialer reaches agent pods by port-forward with the user's own
// credentials.
func portForwardDialer(c *kube.Clients) Dialer {
	return func(ctx context.Context, pod *corev1.Pod) (*http.Client, func(), error) {
		pf, err := kube.DialPortForward(ctx, c.Config, pod.Namespace, pod.Name, manifests.AgentHealthPort)
		if err != nil {
			return nil, nil, err
		}
		return pf.HTTPClient(), func() { pf.Close() }, nil
	}
}

// agentURL is the URL of path on an agent reached through a Dialer's client.
func agentURL(path, query string) string {
	u := "http://kebpf-agent" + path
	if query != "" {
		u += "?" + query
	}
	return u
}

// tracePermissions are what a user needs to reach the agents: find their
// pods and port-forward to them. Named in the README.
var tracePermissions = []kube.Permission{
	{Verb: "list", Resource: "pods", Namespace: manifests.Namespace},
	{Verb: "create", Resource: "pods/portforward", Namespace: manifests.Namespace},
}

// checkAccess fails with one line naming exactly the permissions the user
// lacks, before any connection is tried: a port-forward refused halfway
// through would say far less.
func checkAccess(ctx context.Context, c *kube.Clients, extra ...kube.Permission) error {
	missing, err := c.MissingPermissions(ctx, append(slices.Clone(tracePermissions), extra...))
	if err != nil {
		return err
	}
	if len(missing) == 0 {
		return nil
	}
	var names []string
	for _, p := range missing {
		names = append(names, p.String())
	}
	return fmt.Errorf("permission denied: kubectl ebpf trace needs %s (it reaches each node's agent by a port-forward through the API server)",
		strings.Join(names, " and "))
}

// errNotInstalled: no agent pod exists.
var errNotInstalled = errors.New(`no kubectl-ebpf agent pods found in ` + manifests.Namespace + `: run "kubectl ebpf install"`)

// agentPods returns one agent pod per node, by node name: the running one
// (the newest if a rollout left two), and the nodes whose agent pod is not
// running, with its state.
func agentPods(ctx context.Context, c *kube.Clients) (running map[string]*corev1.Pod, notRunning map[string]string, err error) {
	list, err := c.Kube.CoreV1().Pods(manifests.Namespace).List(ctx, metav1.ListOptions{LabelSelector: manifests.AgentSelector})
	if err != nil {
		return nil, nil, fmt.Errorf("list agent pods: %w", err)
	}
	if len(list.Items) == 0 {
		return nil, nil, errNotInstalled
	}
	running, notRunning = map[string]*corev1.Pod{}, map[string]string{}
	for i := range list.Items {
		p := &list.Items[i]
		node := p.Spec.NodeName
		if node == "" {
			continue // not scheduled: no node's events to read
		}
		if p.Status.Phase != corev1.PodRunning || p.DeletionTimestamp != nil {
			if running[node] == nil {
				s, _ := kube.PodSummary(p)
				notRunning[node] = fmt.Sprintf("agent pod %s is %s", p.Name, s)
			}
			continue
		}
		if old := running[node]; old == nil || p.CreationTimestamp.After(old.CreationTimestamp.Time) {
			running[node] = p
		}
		delete(notRunning, node)
	}
	return running, notRunning, nil
}

// agentError reads a non-200 answer of an agent: its first line.
func agentError(node string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	msg, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	if msg == "" {
		msg = resp.Status
	}
	return fmt.Errorf("node %s: agent answered %d: %s", node, resp.StatusCode, msg)
}
