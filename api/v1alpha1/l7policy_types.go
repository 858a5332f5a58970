package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// L7PolicyKind is the L7Policy kind.
	L7PolicyKind = "L7Policy"
	// L7PolicyResource is the plural resource name of L7Policy.
	L7PolicyResource = "l7policies"

	// L7ConditionAccepted says whether the spec passed our validation
	// (ValidateL7Policy): the xDS server only ever builds Accepted policies.
	L7ConditionAccepted = "Accepted"
	// L7ConditionProgrammed is True when every node listed in status.nodes
	// runs an Envoy that ACKed a configuration carrying this generation.
	L7ConditionProgrammed = "Programmed"

	// Reasons for the Accepted condition.
	L7ReasonValid   = "Valid"
	L7ReasonInvalid = "Invalid"
	// Reasons for the Programmed condition.
	L7ReasonAcked   = "Acked"
	L7ReasonNacked  = "Nacked"
	L7ReasonPending = "Pending"
	// L7ReasonNoDestinations: no node has a running pod the policy selects,
	// so there is nothing to program.
	L7ReasonNoDestinations = "NoDestinations"
)

// L7PolicyGVR addresses L7Policy objects through the dynamic client.
var L7PolicyGVR = SchemeGroupVersion.WithResource(L7PolicyResource)

// L7PolicyGVK is the group/version/kind of L7Policy.
var L7PolicyGVK = SchemeGroupVersion.WithKind(L7PolicyKind)

// L7Policy allows HTTP requests to the selected pods' ports. Connections to a
// selected pod:port are steered to the node's Envoy, which answers 403 to
// every request that matches no rule of any L7Policy selecting that pod:port.
// Policies are additive, like NetworkPolicy; an L7Policy never widens L3/L4:
// NetworkPolicy still decides which connections exist.
//
// +genclient
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Namespaced,shortName=l7p
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=`.status.conditions[?(@.type=="Programmed")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type L7Policy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              L7PolicySpec `json:"spec"`
	// +optional
	Status L7PolicyStatus `json:"status,omitempty"`
}

// L7PolicyList is a list of L7Policies.
//
// +kubebuilder:object:root=true
type L7PolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []L7Policy `json:"items"`
}

// L7PolicySpec selects destination pods and ports and lists the HTTP requests
// allowed to them.
type L7PolicySpec struct {
	// PodSelector selects the destination pods in the policy's namespace. An
	// empty selector selects every pod of the namespace.
	PodSelector metav1.LabelSelector `json:"podSelector"`
	// Ports are the destination TCP ports carrying HTTP/1.1 or h2c.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +listType=map
	// +listMapKey=port
	Ports []L7PolicyPort `json:"ports"`
	// Rules allow requests; a request is allowed when it matches any rule of
	// any policy selecting the pod:port. No rules: every request gets 403.
	// +optional
	// +kubebuilder:validation:MaxItems=64
	Rules []HTTPRule `json:"rules,omitempty"`
}

// L7PolicyPort is one destination port.
type L7PolicyPort struct {
	// Port is the TCP port number on the pod.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port"`
}

// HTTPMethod is an HTTP request method.
// +kubebuilder:validation:Enum=GET;HEAD;POST;PUT;DELETE;CONNECT;OPTIONS;TRACE;PATCH
type HTTPMethod string

// HTTPMethods are the methods a rule may name.
var HTTPMethods = []HTTPMethod{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

// HTTPRule allows requests that match all of its set fields: one of the
// methods, the path, every header match and one of the sources. An empty rule
// allows every request.
type HTTPRule struct {
	// Methods the request may use; empty means any.
	// +optional
	// +kubebuilder:validation:MaxItems=9
	// +listType=set
	Methods []HTTPMethod `json:"methods,omitempty"`
	// Path the request must match (without the query string).
	// +optional
	Path *HTTPPathMatch `json:"path,omitempty"`
	// Headers the request must carry; all must match.
	// +optional
	// +kubebuilder:validation:MaxItems=16
	Headers []HTTPHeaderMatch `json:"headers,omitempty"`
	// From are the allowed clients; empty means any client.
	// +optional
	// +kubebuilder:validation:MaxItems=16
	From []L7Peer `json:"from,omitempty"`
}

// HTTPPathMatch matches the request path in exactly one way.
//
// +kubebuilder:validation:XValidation:rule="[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1",message="exactly one of exact, prefix or regex must be set"
type HTTPPathMatch struct {
	// Exact path, e.g. "/healthz".
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:Pattern=`^/`
	Exact *string `json:"exact,omitempty"`
	// Prefix of the path, e.g. "/api/"; matched per character, not per segment.
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:Pattern=`^/`
	Prefix *string `json:"prefix,omitempty"`
	// Regex the whole path must match, in RE2 syntax (Envoy's engine).
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	Regex *string `json:"regex,omitempty"`
}

// HTTPHeaderMatch matches one request header in exactly one way.
//
// +kubebuilder:validation:XValidation:rule="[has(self.exact), has(self.prefix), has(self.present)].filter(x, x).size() == 1",message="exactly one of exact, prefix or present must be set"
type HTTPHeaderMatch struct {
	// Name of the header, case-insensitive, e.g. "x-tenant".
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=256
	// +kubebuilder:validation:Pattern=`^:?[A-Za-z0-9!#$%&'*+.^_|~-]+$`
	Name string `json:"name"`
	// Exact value.
	// +optional
	// +kubebuilder:validation:MaxLength=4096
	Exact *string `json:"exact,omitempty"`
	// Prefix of the value.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=4096
	Prefix *string `json:"prefix,omitempty"`
	// Present: true requires the header, false requires its absence.
	// +optional
	Present *bool `json:"present,omitempty"`
}

// L7Peer is one allowed client, with NetworkPolicy's meaning: podSelector
// alone selects pods of the policy's namespace, namespaceSelector alone every
// pod of the selected namespaces, both together the matching pods of the
// matching namespaces; ipBlock stands alone.
//
// +kubebuilder:validation:XValidation:rule="has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",message="one of podSelector, namespaceSelector or ipBlock must be set"
// +kubebuilder:validation:XValidation:rule="!has(self.ipBlock) || !(has(self.podSelector) || has(self.namespaceSelector))",message="ipBlock cannot be combined with podSelector or namespaceSelector"
type L7Peer struct {
	// PodSelector selects client pods.
	// +optional
	PodSelector *metav1.LabelSelector `json:"podSelector,omitempty"`
	// NamespaceSelector selects client namespaces.
	// +optional
	NamespaceSelector *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
	// IPBlock selects clients by address.
	// +optional
	IPBlock *IPBlock `json:"ipBlock,omitempty"`
}

// IPBlock is a CIDR with optional holes, as in NetworkPolicy.
type IPBlock struct {
	// CIDR, e.g. "10.0.0.0/8" or "fd00::/8".
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=64
	CIDR string `json:"cidr"`
	// Except are CIDRs inside CIDR that are not allowed.
	// +optional
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=64
	Except []string `json:"except,omitempty"`
}

// L7PolicyStatus is written by the agents.
type L7PolicyStatus struct {
	// ObservedGeneration is the generation the conditions describe.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// Conditions: Accepted (the spec is valid, else the reason and message
	// name the field) and Programmed (every node in nodes ACKed it).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Nodes has one entry per node whose Envoy carries this policy (the
	// nodes running selected pods), each written by that node's agent.
	// +optional
	// +listType=map
	// +listMapKey=node
	Nodes []L7PolicyNodeStatus `json:"nodes,omitempty"`
}

// L7PolicyNodeStatus is the Envoy state of one node for this policy.
type L7PolicyNodeStatus struct {
	// Node is the node name, which is also the Envoy node id.
	Node string `json:"node"`
	// Programmed is True when the node's Envoy ACKed a version carrying the
	// policy's current generation, False when it rejected it.
	// +kubebuilder:validation:Enum=True;False;Unknown
	Programmed metav1.ConditionStatus `json:"programmed"`
	// ObservedGeneration is the policy generation the entry describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// AckedVersion is the last xDS version the node's Envoy accepted.
	// +optional
	AckedVersion string `json:"ackedVersion,omitempty"`
	// NackedVersion is the last version it rejected, if newer than AckedVersion.
	// +optional
	NackedVersion string `json:"nackedVersion,omitempty"`
	// Message is Envoy's NACK error text.
	// +optional
	// +kubebuilder:validation:MaxLength=4096
	Message string `json:"message,omitempty"`
	// LastTransitionTime is when Programmed last changed.
	// +optional
	// +nullable
	LastTransitionTime metav1.Time `json:"lastTransitionTime,omitempty"`
}
