// Package health builds the per-node view of the agents from the DaemonSet,
// the agent pods and the NodeState objects the agents write.
package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/kube"
)

// StaleAfter is how old a NodeState heartbeat may be before the node counts
// as not ready: three of the agent's refresh periods.
const StaleAfter = 90 * time.Second

// ConvergeAfter is how long after the ConfigMap last changed a node's active
// features may still differ from the configured ones: agents follow the
// ConfigMap through a watch within seconds, so a node still off after this
// long is stuck (a feature that fails to attach, an agent that missed the
// change), not slow.
const ConvergeAfter = 30 * time.Second

// Report is the stable shape of `kubectl ebpf status -o json|yaml`.
type Report struct {
	Installed bool      `json:"installed"`
	DaemonSet DaemonSet `json:"daemonSet"`
	// Configured lists the features the ConfigMap enables, sorted; null when
	// the ConfigMap is missing or invalid (ConfigError says why).
	Configured  []string `json:"configured"`
	ConfigError string   `json:"configError,omitempty"`
	Nodes       []Node   `json:"nodes"`

	// missing names what is absent when not installed.
	missing string
	// observed is false while the DaemonSet controller lags behind the spec.
	observed bool
}

// DaemonSet summarises the agent DaemonSet's rollout.
type DaemonSet struct {
	Name    string `json:"name"`
	Image   string `json:"image"`
	Desired int32  `json:"desired"`
	Ready   int32  `json:"ready"`
	Updated int32  `json:"updated"`
}

// Node is one node's agent health.
type Node struct {
	Name     string    `json:"name"`
	Ready    bool      `json:"ready"`
	Version  string    `json:"version"`
	Kernel   string    `json:"kernel"`
	Features []Feature `json:"features"`
	Active   []string  `json:"active"`
	// Converged is true when Active equals the report's Configured features
	// (or there is no valid config to compare with); false without a NodeState.
	// A node that differs counts as not ready only ConvergeAfter after the
	// ConfigMap changed, so a toggle in flight does not fail `status`.
	Converged bool     `json:"converged"`
	Errors    []string `json:"errors"`
	Pod       string   `json:"pod"`

	// state is a few words for progress lines: "ready", "agent Running, not ready".
	state string
}

// Feature is a probed kernel feature.
type Feature struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Detail    string `json:"detail,omitempty"`
}

// State is a short description of the node's agent for progress output.
func (n Node) State() string { return n.state }

// Missing says what is absent when the report is not Installed.
func (r *Report) Missing() string { return r.missing }

// RolledOut reports whether every scheduled agent runs the current spec and is ready.
func (r *Report) RolledOut() bool {
	d := r.DaemonSet
	return r.Installed && r.observed && d.Desired == d.Ready && d.Desired == d.Updated
}

// Healthy reports whether the rollout is complete, the config readable and
// every node ready (which includes converged, past the grace period).
func (r *Report) Healthy() bool {
	if !r.RolledOut() || r.ConfigError != "" {
		return false
	}
	for _, n := range r.Nodes {
		if !n.Ready {
			return false
		}
	}
	return true
}

// Settled is Healthy with every node's active features equal to the
// configured ones, grace period or not: what the --wait flags wait for.
func (r *Report) Settled() bool {
	if !r.Healthy() {
		return false
	}
	for _, n := range r.Nodes {
		if !n.Converged {
			return false
		}
	}
	return true
}

// NotReady lists "node (why)" for every node that is not ready.
func (r *Report) NotReady() []string {
	var out []string
	for _, n := range r.Nodes {
		if !n.Ready {
			why := strings.Join(n.Errors, "; ")
			if why == "" {
				why = n.state
			}
			out = append(out, fmt.Sprintf("%s (%s)", n.Name, why))
		}
	}
	return out
}

// Collect reads the DaemonSet, agent pods, nodes and NodeStates. A missing
// namespace, CRD or DaemonSet yields a report with Installed false, not an error.
func Collect(ctx context.Context, c *kube.Clients, now time.Time) (*Report, error) {
	r := &Report{Nodes: []Node{}}
	if _, err := c.Kube.CoreV1().Namespaces().Get(ctx, manifests.Namespace, metav1.GetOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			r.missing = "namespace " + manifests.Namespace
			return r, nil
		}
		return nil, fmt.Errorf("get namespace %s: %w", manifests.Namespace, err)
	}
	if _, err := c.Dynamic.Resource(kube.CRDGVR).Get(ctx, manifests.CRDName, metav1.GetOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			r.missing = "CRD " + manifests.CRDName
			return r, nil
		}
		return nil, fmt.Errorf("get CRD %s: %w", manifests.CRDName, err)
	}
	ds, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.DaemonSetName, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) {
			r.missing = "DaemonSet " + manifests.DaemonSetName
			return r, nil
		}
		return nil, fmt.Errorf("get DaemonSet %s: %w", manifests.DaemonSetName, err)
	}
	r.Installed = true
	r.DaemonSet = DaemonSet{
		Name:    ds.Name,
		Image:   kube.AgentImage(ds),
		Desired: ds.Status.DesiredNumberScheduled,
		Ready:   ds.Status.NumberReady,
		Updated: ds.Status.UpdatedNumberScheduled,
	}
	// A DaemonSet the controller has not looked at yet reports stale counts.
	r.observed = ds.Status.ObservedGeneration >= ds.Generation

	nodes, err := c.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	pods, err := c.Kube.CoreV1().Pods(manifests.Namespace).List(ctx, metav1.ListOptions{LabelSelector: manifests.AgentSelector})
	if err != nil {
		return nil, fmt.Errorf("list agent pods: %w", err)
	}
	states, err := c.NodeStates().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodestates: %w", err)
	}
	podByNode := map[string]*corev1.Pod{}
	for i := range pods.Items {
		p := &pods.Items[i]
		// During a rolling update prefer the pod that is not going away.
		if old, ok := podByNode[p.Spec.NodeName]; !ok || old.DeletionTimestamp != nil {
			podByNode[p.Spec.NodeName] = p
		}
	}
	stateByNode := map[string]*apiv1.NodeState{}
	for i := range states.Items {
		stateByNode[states.Items[i].Name] = &states.Items[i]
	}
	var configured []string
	var changed time.Time
	cm, err := c.GetConfigMap(ctx)
	switch {
	case errors.Is(err, kube.ErrNotInstalled):
		// Nothing to converge to. The agent pods cannot start without it (a
		// required volume), which their rows show already.
	case err != nil:
		return nil, err
	default:
		// Judged as the agent judges it: an unknown feature name makes the
		// whole config invalid.
		cfg, err := apiv1.ParseConfig([]byte(cm.Data[apiv1.ConfigKey]))
		if err != nil {
			r.ConfigError = fmt.Sprintf("ConfigMap %s: %v", manifests.ConfigMapName, err)
			break
		}
		configured = kube.EnabledFeatures(cfg)
		r.Configured = configured
		changed = kube.ConfigChanged(cm)
	}
	for _, n := range nodes.Items {
		row := nodeRow(n, podByNode[n.Name], stateByNode[n.Name], now)
		switch {
		case stateByNode[n.Name] == nil:
		case r.Configured == nil:
			row.Converged = true // no valid config to differ from
		default:
			converge(&row, configured, changed, now)
		}
		r.Nodes = append(r.Nodes, row)
	}
	sort.Slice(r.Nodes, func(i, j int) bool { return r.Nodes[i].Name < r.Nodes[j].Name })
	return r, nil
}

func nodeRow(n corev1.Node, pod *corev1.Pod, ns *apiv1.NodeState, now time.Time) Node {
	row := Node{Name: n.Name, Kernel: n.Status.NodeInfo.KernelVersion, Features: []Feature{}, Active: []string{}, Errors: []string{}}
	podOK := false
	switch {
	case pod == nil:
		row.Errors = append(row.Errors, "no agent pod")
		row.state = "no agent pod yet"
	default:
		row.Pod = pod.Name
		summary, _ := kube.PodSummary(pod)
		row.state = "agent " + summary
		podOK = summary == string(corev1.PodRunning)
		if !podOK && summary != "Running, not ready" {
			row.Errors = append(row.Errors, "agent pod "+summary)
		}
	}
	stateOK := false
	switch {
	case ns == nil:
		row.Errors = append(row.Errors, "no NodeState reported")
	default:
		s := ns.Status
		row.Version = s.AgentVersion
		if s.Kernel != "" {
			row.Kernel = s.Kernel
		}
		for _, f := range s.Features {
			row.Features = append(row.Features, Feature(f))
		}
		row.Active = append(row.Active, s.Active...)
		row.Errors = append(row.Errors, s.Errors...)
		age := now.Sub(s.Heartbeat.Time)
		switch {
		case s.Heartbeat.IsZero():
			row.Errors = append(row.Errors, "no heartbeat")
		case age > StaleAfter:
			row.Errors = append(row.Errors, fmt.Sprintf("heartbeat stale (%s ago)", age.Round(time.Second)))
		case !s.Ready:
			if len(s.Errors) == 0 {
				row.Errors = append(row.Errors, "agent reports not ready")
			}
		default:
			stateOK = true
		}
	}
	row.Ready = podOK && stateOK
	switch {
	case row.Ready:
		row.state = "ready"
	case pod != nil && (podOK || row.state == "agent Running, not ready"):
		row.state = "agent Running, not ready"
		if len(row.Errors) > 0 {
			row.state += " (" + strings.Join(row.Errors, "; ") + ")"
		}
	}
	return row
}

// converge compares the node's active features with the configured ones.
// The ConfigMap's change time comes from the API server's clock and now from
// ours; the 30s grace period is coarse enough that ordinary clock skew does
// not matter, and a skewed clock errs one way or the other by the skew only.
func converge(row *Node, configured []string, changed, now time.Time) {
	active := slices.Clone(row.Active)
	sort.Strings(active)
	active = slices.Compact(active)
	row.Converged = slices.Equal(active, configured)
	if row.Converged {
		return
	}
	detail := fmt.Sprintf("active %s, configured %s", dashList(active), dashList(configured))
	if now.Sub(changed) <= ConvergeAfter {
		if row.Ready {
			row.state = "ready, converging (" + detail + ")"
		}
		return
	}
	msg := fmt.Sprintf("features not converged %s after the config changed: %s", now.Sub(changed).Round(time.Second), detail)
	row.Errors = append(row.Errors, msg)
	if row.Ready {
		row.Ready = false
		row.state = "agent Running, not ready (" + msg + ")"
	}
}

func dashList(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ",")
}

// PrintTable writes one row per node; wide adds FEATURES and POD.
func PrintTable(w io.Writer, r *Report, wide bool) error {
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	hdr := "NODE\tREADY\tVERSION\tKERNEL\tACTIVE\tERRORS"
	if wide {
		hdr += "\tFEATURES\tPOD"
	}
	fmt.Fprintln(tw, hdr)
	for _, n := range r.Nodes {
		line := fmt.Sprintf("%s\t%t\t%s\t%s\t%s\t%s", n.Name, n.Ready, dash(n.Version), dash(n.Kernel), dash(strings.Join(n.Active, ",")), dash(strings.Join(n.Errors, "; ")))
		if wide {
			var avail []string
			for _, f := range n.Features {
				if f.Available {
					avail = append(avail, f.Name)
				}
			}
			line += fmt.Sprintf("\t%s\t%s", dash(strings.Join(avail, ",")), dash(n.Pod))
		}
		fmt.Fprintln(tw, line)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.ConfigError != "" {
		// Not a node's fault, so not in a row; the agents reject this config.
		_, err := fmt.Fprintf(w, "config: %s\n", r.ConfigError)
		return err
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
