// Package nodestate holds the NodeState custom resource: one cluster-scoped
// object per node, written only by that node's agent and read by the plugin.
package nodestate

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

const (
	// Group is the API group of our CRDs.
	Group = "kubectl-ebpf.io"
	// Version is the served version of NodeState.
	Version = "v1alpha1"
	// Kind is the NodeState kind.
	Kind = "NodeState"
	// Resource is the plural resource name of NodeState.
	Resource = "nodestates"
)

// GVR addresses NodeState objects through the dynamic client.
var GVR = schema.GroupVersionResource{Group: Group, Version: Version, Resource: Resource}

// GVK is the group/version/kind written into TypeMeta of every NodeState.
var GVK = schema.GroupVersionKind{Group: Group, Version: Version, Kind: Kind}

// NodeState reports what one node's agent found and runs.
type NodeState struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Status            Status `json:"status"`
}

// Status is the agent-owned state of a node.
type Status struct {
	AgentVersion string      `json:"agentVersion"`
	Kernel       string      `json:"kernel"` // uname release
	Ready        bool        `json:"ready"`
	Features     []Feature   `json:"features"`         // kernel features probed
	Active       []string    `json:"active,omitempty"` // datapath features attached now, e.g. "sockstats"
	Errors       []string    `json:"errors,omitempty"`
	Heartbeat    metav1.Time `json:"heartbeat"`
}

// Feature is one probed kernel capability.
type Feature struct {
	Name      string `json:"name"`
	Available bool   `json:"available"`
	Detail    string `json:"detail,omitempty"`
}

// ToUnstructured converts ns for the dynamic client, filling in apiVersion
// and kind when the caller left them empty (server-side apply requires both).
func ToUnstructured(ns *NodeState) (*unstructured.Unstructured, error) {
	c := *ns
	if c.APIVersion == "" || c.Kind == "" {
		c.APIVersion = GVK.GroupVersion().String()
		c.Kind = Kind
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&c)
	if err != nil {
		return nil, fmt.Errorf("convert nodestate %s: %w", ns.Name, err)
	}
	return &unstructured.Unstructured{Object: m}, nil
}

// FromUnstructured converts an object read with the dynamic client.
func FromUnstructured(u *unstructured.Unstructured) (*NodeState, error) {
	var ns NodeState
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &ns); err != nil {
		return nil, fmt.Errorf("convert nodestate %s: %w", u.GetName(), err)
	}
	return &ns, nil
}
