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
