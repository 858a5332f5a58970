// Package cni closes the gap between "the pod's network exists" and "the
// pod's NetworkPolicy is in the kernel".
//
// Without it the agent learns a new pod's IP from the API server, which the
// kubelet writes only after the sandbox is up and the containers started: a
// new pod's first packets could leave before its policy was enforced. So
// kebpf-cni is chained after the cluster's own CNI plugin (bridge, ptp,
// kindnet). On ADD it hands the pod's IPs from the previous plugin's result
// to the node agent over a unix socket and returns only when the agent has
// programmed the pod's endpoint and attached the programs to its host-side
// veth. The runtime starts containers only after every CNI plugin returned,
// so nothing the pod runs can send or receive a packet before its policy
// applies (the approach Cilium's and Calico's CNI plugins take).
//
// Failure policy: while the policy datapath is loaded on the node (its
// pinned map, the "enforced marker", exists), an ADD that cannot reach the
// agent fails, and the kubelet retries the sandbox; a pod never starts
// unprotected. With the policy feature off or uninstalled the marker is
// gone and the plugin passes the previous result through untouched.
//
// The package holds both sides: the plugin (Plugin, no Kubernetes client,
// so the binary stays small), the agent's socket server (Serve) and the
// conflist installer the agent runs (Installer, Remove).
package cni

// PluginType is the "type" of our entry in a CNI conflist and the name of
// the plugin binary in the CNI bin dir.
const PluginType = "kebpf-cni"

// DefaultSocket is where the agent serves the plugin (a hostPath of the
// agent pod).
const DefaultSocket = "/run/kubectl-ebpf/cni.sock"

// Default CNI directories, as on kind nodes and most distributions.
const (
	DefaultConfDir = "/etc/cni/net.d"
	DefaultBinDir  = "/opt/cni/bin"
)

// Socket API paths.
const (
	pathAdd = "/v1/add"
	pathDel = "/v1/del"
)

// AddRequest asks the agent to program a pod whose sandbox is being created.
type AddRequest struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// UID is empty when the runtime does not pass K8S_POD_UID.
	UID         string `json:"uid,omitempty"`
	ContainerID string `json:"containerID"`
	Netns       string `json:"netns"`
	// IPs are the pod's addresses from the previous plugin's result.
	IPs []string `json:"ips"`
	// HostInterfaces are the result's interfaces outside the sandbox (the
	// host-side veth, a bridge).
	HostInterfaces []string `json:"hostInterfaces,omitempty"`
}

// AddResponse is the agent's answer once the pod is programmed.
type AddResponse struct {
	// Enforced: the policy feature runs on this node and the pod's
	// endpoint is programmed. False: the feature is off, nothing was done.
	Enforced bool `json:"enforced"`
	// Endpoint is the datapath endpoint ID of the pod.
	Endpoint uint32 `json:"endpoint,omitempty"`
	// Ingress and Egress say whether some policy selects the pod in that
	// direction (default deny plus the policies' allows).
	Ingress bool `json:"ingress,omitempty"`
	Egress  bool `json:"egress,omitempty"`
}

// DelRequest tells the agent a pod's sandbox is gone.
type DelRequest struct {
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	UID         string `json:"uid,omitempty"`
	ContainerID string `json:"containerID"`
}
