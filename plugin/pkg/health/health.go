// Package health builds the per-node view of the agents from the DaemonSet,
// the agent pods and the NodeState objects the agents write.
package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	appsv1 "k8s.io/api/apps/v1"
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
	// Envoy is the l7 feature's Envoy DaemonSet, absent while there is none.
	Envoy *DaemonSet `json:"envoy,omitempty"`
	// EnvoyError says what is wrong with it as a whole: missing while the
	// config enables l7.
	EnvoyError string `json:"envoyError,omitempty"`
	Nodes      []Node `json:"nodes"`

	// missing names what is absent when not installed.
	missing string
	// observed is false while the DaemonSet controller lags behind the spec.
	observed bool
	// envoyObserved is observed for the Envoy DaemonSet.
	envoyObserved bool
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
	// L7 is what the agent reports of the node's Envoy (NodeState
	// status.l7): ready, the xDS versions it serves, ACKed and NACKed.
	L7 *apiv1.L7NodeStatus `json:"l7,omitempty"`
	// EnvoyPod is the node's Envoy pod, while the Envoy DaemonSet exists.
	EnvoyPod string `json:"envoyPod,omitempty"`
	// Trace counts the node's trace events and losses since its agent
	// started (NodeState status.trace).
	Trace *apiv1.TraceNodeStatus `json:"trace,omitempty"`

	// state is a few words for progress lines: "ready", "agent Running, not ready".
	state string
	// envoyPending: the node runs the configured features, but l7's Envoy
	// is not ready.
	envoyPending bool
}

// Feature is a probed kernel feature.
type Feature struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Detail    string `json:"detail,omitempty"`
}

// State is a short description of the node's agent for progress output.
func (n Node) State() string { return n.state }

// WaitsForEnvoy reports whether the node runs the configured features and
// only its Envoy (l7) is not ready.
func (n Node) WaitsForEnvoy() bool { return n.envoyPending }

// Missing says what is absent when the report is not Installed.
func (r *Report) Missing() string { return r.missing }

// RolledOut reports whether every scheduled agent runs the current spec and is ready.
func (r *Report) RolledOut() bool {
	return r.Installed && rolledOut(r.DaemonSet, r.observed)
}

func rolledOut(d DaemonSet, observed bool) bool {
	return observed && d.Desired == d.Ready && d.Desired == d.Updated
}

// L7 reports whether the config enables l7.
func (r *Report) L7() bool { return slices.Contains(r.Configured, apiv1.FeatureL7) }

// Healthy reports whether the rollout is complete, the config readable and
// every node ready (which includes converged, past the grace period).
func (r *Report) Healthy() bool {
	if !r.RolledOut() || r.ConfigError != "" || r.EnvoyError != "" {
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
// configured ones (and, with l7, its Envoy ready and the Envoy DaemonSet
// rolled out), grace period or not: what the --wait flags wait for.
func (r *Report) Settled() bool {
	if !r.Healthy() {
		return false
	}
	if r.L7() && (r.Envoy == nil || !rolledOut(*r.Envoy, r.envoyObserved)) {
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
	r.DaemonSet, r.observed = summary(ds, kube.AgentImage(ds))
	envoyDS, err := c.Kube.AppsV1().DaemonSets(manifests.Namespace).Get(ctx, manifests.EnvoyDaemonSetName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		envoyDS = nil
	case err != nil:
		return nil, fmt.Errorf("get DaemonSet %s: %w", manifests.EnvoyDaemonSetName, err)
	default:
		d, observed := summary(envoyDS, containerImage(envoyDS, manifests.EnvoyContainer))
		r.Envoy, r.envoyObserved = &d, observed
	}

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
	podByNode := byNode(pods.Items)
	envoyPodByNode := map[string]*corev1.Pod{}
	if envoyDS != nil {
		envoyPods, err := c.Kube.CoreV1().Pods(manifests.Namespace).List(ctx, metav1.ListOptions{LabelSelector: manifests.EnvoySelector})
		if err != nil {
			return nil, fmt.Errorf("list Envoy pods: %w", err)
		}
		envoyPodByNode = byNode(envoyPods.Items)
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
	if r.L7() && envoyDS == nil {
		r.EnvoyError = fmt.Sprintf("l7 is enabled but DaemonSet %s does not exist: run \"kubectl ebpf enable l7\"", manifests.EnvoyDaemonSetName)
	}
	for _, n := range nodes.Items {
		row := nodeRow(n, podByNode[n.Name], stateByNode[n.Name], now)
		if p := envoyPodByNode[n.Name]; p != nil {
			row.EnvoyPod = p.Name
		}
		switch {
		case stateByNode[n.Name] == nil:
		case r.Configured == nil:
			row.Converged = true // no valid config to differ from
		default:
			converge(&row, configured, changed, now)
			if r.L7() && slices.Contains(row.Active, apiv1.FeatureL7) {
				envoyReady(&row, envoyPodByNode[n.Name], changed, now)
			}
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
		row.L7 = s.L7.DeepCopy()
		row.Trace = s.Trace.DeepCopy()
		if l7 := s.L7; l7 != nil && l7.NackedVersion != "" {
			// Envoy keeps running AckedVersion; the policies new in the
			// rejected version are not enforced on this node.
			row.Errors = append(row.Errors, fmt.Sprintf("Envoy rejected xDS version %s: %s", l7.NackedVersion, l7.NackMessage))
		}
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

// envoyReady judges, on a node running l7, the Envoy the agent reports:
// until it is ready, connections to the selected pod:ports fail (closed).
// Within ConvergeAfter of the config change it is still starting; after
// that the node is not ready.
func envoyReady(row *Node, pod *corev1.Pod, changed, now time.Time) {
	if row.L7 != nil && row.L7.EnvoyReady {
		return
	}
	row.envoyPending = row.Converged
	row.Converged = false
	why := "Envoy not ready"
	summary := ""
	if pod != nil {
		summary, _ = kube.PodSummary(pod)
	}
	switch {
	case pod == nil:
		why += " (no Envoy pod)"
	case summary != string(corev1.PodRunning):
		why += " (Envoy pod " + summary + ")"
	case row.L7 != nil && row.L7.Version != "" && row.L7.AckedVersion != row.L7.Version:
		why += " (xDS version " + row.L7.Version + " not ACKed)"
	}
	if now.Sub(changed) <= ConvergeAfter {
		if row.Ready {
			row.state = "ready, converging (" + why + ")"
		}
		return
	}
	row.Errors = append(row.Errors, why)
	if row.Ready {
		row.Ready = false
		row.state = "agent Running, not ready (" + why + ")"
	}
}

// summary is ds's rollout, and whether its controller has seen its spec (a
// DaemonSet the controller has not looked at yet reports stale counts).
func summary(ds *appsv1.DaemonSet, image string) (DaemonSet, bool) {
	return DaemonSet{
		Name:    ds.Name,
		Image:   image,
		Desired: ds.Status.DesiredNumberScheduled,
		Ready:   ds.Status.NumberReady,
		Updated: ds.Status.UpdatedNumberScheduled,
	}, ds.Status.ObservedGeneration >= ds.Generation
}

func containerImage(ds *appsv1.DaemonSet, name string) string {
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c.Image
		}
	}
	return ""
}

// byNode maps node name to its pod; during a rolling update it prefers the
// pod that is not going away.
func byNode(pods []corev1.Pod) map[string]*corev1.Pod {
	out := map[string]*corev1.Pod{}
	for i := range pods {
		p := &pods[i]
		if old, ok := out[p.Spec.NodeName]; !ok || old.DeletionTimestamp != nil {
			out[p.Spec.NodeName] = p
		}
	}
	return out
}

func dashList(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ",")
}

// PrintTable writes one row per node; wide adds FEATURES and POD. While
// l7 is configured (or an agent still reports its Envoy) ENVOY and ACKED
// (the xDS version that Envoy accepted) come before ERRORS, and wide adds
// ENVOY-POD; without l7 the table is as it always was.
func PrintTable(w io.Writer, r *Report, wide bool) error {
	l7 := r.L7()
	for _, n := range r.Nodes {
		l7 = l7 || n.L7 != nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	hdr := "NODE\tREADY\tVERSION\tKERNEL\tACTIVE"
	if l7 {
		hdr += "\tENVOY\tACKED"
	}
	hdr += "\tERRORS"
	if wide {
		hdr += "\tFEATURES\tPOD"
		if l7 {
			hdr += "\tENVOY-POD"
		}
	}
	fmt.Fprintln(tw, hdr)
	for _, n := range r.Nodes {
		line := fmt.Sprintf("%s\t%t\t%s\t%s\t%s", n.Name, n.Ready, dash(n.Version), dash(n.Kernel), dash(strings.Join(n.Active, ",")))
		if l7 {
			envoy, acked := "-", "-"
			if n.L7 != nil {
				envoy, acked = "not ready", dash(n.L7.AckedVersion)
				if n.L7.EnvoyReady {
					envoy = "ready"
				}
			}
			line += "\t" + envoy + "\t" + acked
		}
		line += "\t" + dash(strings.Join(n.Errors, "; "))
		if wide {
			var avail []string
			for _, f := range n.Features {
				if f.Available {
					avail = append(avail, f.Name)
				}
			}
			line += fmt.Sprintf("\t%s\t%s", dash(strings.Join(avail, ",")), dash(n.Pod))
			if l7 {
				line += "\t" + dash(n.EnvoyPod)
			}
		}
		fmt.Fprintln(tw, line)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Not a node's fault, so not in a row.
	if r.ConfigError != "" {
		// The agents reject this config.
		if _, err := fmt.Fprintf(w, "config: %s\n", r.ConfigError); err != nil {
			return err
		}
	}
	if r.EnvoyError != "" {
		if _, err := fmt.Fprintf(w, "envoy: %s\n", r.EnvoyError); err != nil {
			return err
		}
	}
	// Lost trace events are no fault of the node's health, but they are
	// never silent: a line per node that lost any.
	for _, n := range r.Nodes {
		if line := traceLostLine(n); line != "" {
			if _, err := fmt.Fprintln(w, line); err != nil {
				return err
			}
		}
	}
	return nil
}

// traceLostLine says how many trace events node n lost, by reason; "" when
// none.
func traceLostLine(n Node) string {
	if n.Trace == nil || len(n.Trace.Lost) == 0 {
		return ""
	}
	var total int64
	var parts []string
	for _, r := range slices.Sorted(maps.Keys(n.Trace.Lost)) {
		if c := n.Trace.Lost[r]; c > 0 {
			total += c
			parts = append(parts, fmt.Sprintf("%s %d", r, c))
		}
	}
	if total == 0 {
		return ""
	}
	return fmt.Sprintf("trace: node %s lost %d events since its agent started (%s)", n.Name, total, strings.Join(parts, ", "))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
