package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// NodeStateKind is the NodeState kind.
	NodeStateKind = "NodeState"
	// NodeStateResource is the plural resource name of NodeState.
	NodeStateResource = "nodestates"
)

// NodeStateGVR is the NodeState resource (RBAC, discovery, uninstall).
var NodeStateGVR = SchemeGroupVersion.WithResource(NodeStateResource)

// NodeStateGVK is the group/version/kind written into TypeMeta of every NodeState.
var NodeStateGVK = SchemeGroupVersion.WithKind(NodeStateKind)

// NodeState is the health of the kubectl-ebpf agent on one node, named like
// the node: one cluster-scoped object per node, written only by that node's
// agent and read by the plugin. No status subresource: the object is nothing
// but status, written by one agent, so a plain create/update of the whole
// object is the simplest protocol.
//
// +genclient
// +genclient:nonNamespaced
// +genclient:noStatus
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=kns
// +kubebuilder:printcolumn:name="Ready",type=boolean,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="Version",type=string,JSONPath=`.status.agentVersion`
// +kubebuilder:printcolumn:name="Kernel",type=string,JSONPath=`.status.kernel`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodeState struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	// +optional
	Status NodeStateStatus `json:"status"`
}

// NodeStateList is a list of NodeStates.
//
// +kubebuilder:object:root=true
type NodeStateList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeState `json:"items"`
}

// NodeStateStatus is the agent-owned state of a node.
type NodeStateStatus struct {
	// AgentVersion is the version of the agent binary.
	// +optional
	AgentVersion string `json:"agentVersion"`
	// Kernel is the kernel release (uname -r) of the node.
	// +optional
	Kernel string `json:"kernel"`
	// Ready is true when the agent has attached every enabled datapath feature.
	// +optional
	Ready bool `json:"ready"`
	// Features are the kernel features probed by the agent. Go writes nil
	// slices and zero times as null, hence nullable.
	// +optional
	// +nullable
	Features []KernelFeature `json:"features"`
	// Active are the datapath features attached now, e.g. "sockstats".
	// +optional
	// +nullable
	Active []string `json:"active,omitempty"`
	// Errors the agent reports for this node.
	// +optional
	// +nullable
	Errors []string `json:"errors,omitempty"`
	// L7 is the state of the node's Envoy while the l7 feature is active.
	// +optional
	L7 *L7NodeStatus `json:"l7,omitempty"`
	// Trace counts the node's trace events since the agent started.
	// +optional
	Trace *TraceNodeStatus `json:"trace,omitempty"`
	// Heartbeat is the last time the agent refreshed this object.
	// +optional
	// +nullable
	Heartbeat metav1.Time `json:"heartbeat"`
}

// KernelFeature is one probed kernel capability.
type KernelFeature struct {
	// Name of the probe, e.g. "link-tcx".
	Name string `json:"name"`
	// Available is true when the probe succeeded on this kernel.
	Available bool `json:"available"`
	// Detail says why the feature is unavailable.
	// +optional
	Detail string `json:"detail,omitempty"`
}

// L7NodeStatus is what the agent knows of its node's Envoy, which it
// configures over xDS (a unix socket on the node).
type L7NodeStatus struct {
	// EnvoyReady: the node's Envoy pod is Ready (its admin /ready, which
	// needs its first xDS config) and its cgroup is known (so its own
	// upstream connections are never steered), so steering to it is on;
	// while false, connections to selected pod:ports fail (fail closed).
	EnvoyReady bool `json:"envoyReady"`
	// Version is the xDS version the agent serves for this node now.
	// +optional
	Version string `json:"version,omitempty"`
	// AckedVersion is the last version Envoy accepted.
	// +optional
	AckedVersion string `json:"ackedVersion,omitempty"`
	// NackedVersion is the last version Envoy rejected, if newer than
	// AckedVersion (Envoy keeps running AckedVersion).
	// +optional
	NackedVersion string `json:"nackedVersion,omitempty"`
	// NackMessage is Envoy's error text for NackedVersion.
	// +optional
	NackMessage string `json:"nackMessage,omitempty"`
	// Steered is how many local pod:ports connections are steered to
	// Envoy for.
	// +optional
	Steered int32 `json:"steered,omitempty"`
	// Policies is how many L7Policies select pods on this node.
	// +optional
	Policies int32 `json:"policies,omitempty"`
}

// TraceNodeStatus counts one agent's trace events (kubectl ebpf trace),
// the numbers its kebpf_trace_events_total and
// kebpf_trace_events_lost_total metrics export. Counts refresh with the
// heartbeat; a reason's first loss is published at once.
type TraceNodeStatus struct {
	// Published counts events the agent received from the datapath, by
	// type (policy, lb, cni, l7).
	// +optional
	Published map[string]int64 `json:"published,omitempty"`
	// Lost counts lost events by reason (kernel-buffer-full,
	// agent-buffer-overrun, slow-client); absent reasons lost none.
	// +optional
	Lost map[string]int64 `json:"lost,omitempty"`
}
