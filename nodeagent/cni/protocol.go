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

import (
	"encoding/json"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// The CNI protocol (environment, stdin, results, errors, VERSION) is
// github.com/containernetworking/cni's: pkg/skel dispatches the commands to
// Plugin, pkg/types parses the config and CNI_ARGS and converts the
// previous plugin's result. Below: our part of the config, then the API of
// the agent's socket.

// Versions are the CNI spec versions we support. We never build a result
// ourselves, only return the previous plugin's, so every version with
// prevResult (0.3.0 on) works.
var Versions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// CNI error codes (spec section "Error"): 7 invalid network config, 11 try
// again later; 100+ are ours.
const (
	codeInvalidConfig = types.ErrInvalidNetworkConfig
	codeTryAgain      = types.ErrTryAgainLater
	codeAgentRefused  = 100
)

// DefaultTimeout bounds one ADD: the agent answers as soon as the pod's
// endpoint is programmed (milliseconds), unless the API server is slow to
// show it the pod.
const DefaultTimeout = 30 * time.Second

// delTimeout bounds telling the agent about a DEL.
const delTimeout = 5 * time.Second

// NetConf is our entry in the conflist, as the runtime passes it on stdin
// (with prevResult added).
type NetConf struct {
	types.PluginConf
	// Socket of the agent; DefaultSocket when empty.
	Socket string `json:"socket,omitempty"`
	// EnforcedMarker exists while the policy datapath is loaded on the node
	// (a pinned map). When the agent cannot be reached and it exists, ADD
	// fails (fail closed); when it does not exist, ADD passes through.
	EnforcedMarker string `json:"enforcedMarker,omitempty"`
	// TimeoutSeconds bounds an ADD (DefaultTimeout when 0).
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
}

// parseConf reads our entry of the conflist (a *types.Error when it is
// not one), with defaults.
func parseConf(b []byte) (NetConf, error) {
	var conf NetConf
	if err := json.Unmarshal(b, &conf); err != nil {
		return conf, types.NewError(codeInvalidConfig, "parse network config", err.Error())
	}
	if conf.Socket == "" {
		conf.Socket = DefaultSocket
	}
	return conf, nil
}

// k8sArgs are the CNI_ARGS a Kubernetes runtime passes.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

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
