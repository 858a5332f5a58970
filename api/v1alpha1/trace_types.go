package v1alpha1

import "time"

// The trace wire format: what an agent's /trace stream carries and what
// `kubectl ebpf trace -o json` prints, one JSON object per line. These are
// plain types, not a resource: nothing stores them in the API server. Field
// names are stable; new fields are only ever added.

// Trace event types (TraceEvent.Type), the values of `--type`.
const (
	TraceTypeLB     = "lb"
	TraceTypePolicy = "policy"
	TraceTypeCNI    = "cni"
	TraceTypeL7     = "l7"
)

// TraceTypes are the event types in the order `--type` lists them.
var TraceTypes = []string{TraceTypeLB, TraceTypePolicy, TraceTypeCNI, TraceTypeL7}

// Trace verdicts (TraceEvent.Verdict), the values of `--verdict`.
const (
	TraceVerdictAllowed    = "allowed"    // policy: a flow allowed
	TraceVerdictDenied     = "denied"     // policy: dropped; L7: RBAC deny
	TraceVerdictTranslated = "translated" // lb: connect() sent to a backend
	TraceVerdictRefused    = "refused"    // lb: no endpoints; cni: sandbox refused
	TraceVerdictDestroyed  = "destroyed"  // lb: UDP socket of a removed backend
	TraceVerdictAdmitted   = "admitted"   // cni: sandbox released
	TraceVerdictRedirected = "redirected" // l7: steered to Envoy
)

// TraceVerdicts are the known verdicts.
var TraceVerdicts = []string{TraceVerdictAllowed, TraceVerdictDenied, TraceVerdictTranslated,
	TraceVerdictRefused, TraceVerdictDestroyed, TraceVerdictAdmitted, TraceVerdictRedirected}

// Trace reasons (TraceEvent.Reason) of policy events.
const (
	TraceReasonPolicy      = "policy"       // a rule of Policy allowed it
	TraceReasonDefaultDeny = "default-deny" // no rule allowed it; Policy selects the pod
	TraceReasonNotEnforced = "not-enforced" // no policy selects the pod in this direction
	TraceReasonHost        = "host"         // the peer is a node address
	TraceReasonRevoked     = "revoked"      // an established flow cut after a policy change
	TraceReasonRelated     = "related"      // ICMP error of a tracked flow
	// TraceReasonL7Bypass: a SYN to an L7-protected pod:port that did not
	// come from the node's Envoy (e.g. a client on another node), dropped.
	TraceReasonL7Bypass = "l7-bypass"
)

// TraceLine is one line of a trace stream: exactly one of Event and Lost.
// A lost-events notice travels in the stream at the place the loss
// happened, so a reader sees the gap where it is.
//
// +kubebuilder:object:generate=false
type TraceLine struct {
	Event *TraceEvent `json:"event,omitempty"`
	Lost  *TraceLost  `json:"lost,omitempty"`
}

// TraceEvent is one datapath decision.
//
// +kubebuilder:object:generate=false
type TraceEvent struct {
	// Time is when the datapath decided (wall clock, converted from the
	// kernel's monotonic clock by the agent).
	Time time.Time `json:"time"`
	// Node is the node whose datapath decided.
	Node string `json:"node"`
	// Type is one of TraceTypes.
	Type string `json:"type"`
	// Verdict is one of TraceVerdicts.
	Verdict string `json:"verdict"`
	// Direction is "ingress" or "egress" as seen from the pod the datapath
	// decided for (policy events).
	Direction string `json:"direction,omitempty"`
	// Source and Destination are the packet's or the connect()'s ends.
	Source      TracePeer `json:"source"`
	Destination TracePeer `json:"destination"`
	// Protocol is TCP, UDP, SCTP, ICMP or ICMPv6 (else the IP protocol
	// number).
	Protocol string `json:"protocol,omitempty"`
	// Process is the process context where the hook has it (socket hooks).
	Process *TraceProcess `json:"process,omitempty"`
	// Policy names the deciding policy: the rule that allowed, or the
	// policy whose default deny applied (Reason says which).
	Policy *TracePolicy `json:"policy,omitempty"`
	// Reason is one of the TraceReason* values (policy), or a short
	// machine-readable reason of the feature (cni, lb).
	Reason string `json:"reason,omitempty"`
	// Message is a human-readable explanation where there is more to say.
	Message string `json:"message,omitempty"`
	// Service is the Service a connect() addressed (lb events; l7 events
	// of a connection that went through one).
	Service *TraceService `json:"service,omitempty"`
	// HTTP is Envoy's access-log entry of one request (l7 events).
	HTTP *TraceHTTP `json:"http,omitempty"`
}

// TraceService names the Service and port a connect() addressed. The
// event's Destination is the chosen backend (translated) or the Service
// address itself (refused).
//
// +kubebuilder:object:generate=false
type TraceService struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Port is the Service port's name (empty for an unnamed port).
	Port string `json:"port,omitempty"`
	// IP and PortNumber are the address the client dialed.
	IP         string `json:"ip"`
	PortNumber uint16 `json:"portNumber"`
}

// TraceHTTP is one HTTP request as Envoy saw and decided it.
//
// +kubebuilder:object:generate=false
type TraceHTTP struct {
	Method    string `json:"method,omitempty"`
	Authority string `json:"authority,omitempty"`
	Path      string `json:"path,omitempty"`
	// Status is the response code (403 for an RBAC deny).
	Status int `json:"status,omitempty"`
}

// The agent's loopback HTTP paths the plugin reaches through a
// port-forward (the API server's pods/portforward).
const (
	// TracePath streams TraceLines (query: TraceQuery.Encode).
	TracePath = "/trace"
	// ExplainPath answers a PolicyExplanation (query: ExplainQuery).
	ExplainPath = "/explain"
)

// PolicyExplanation is the agent's answer to "would this connection be
// allowed, and why", computed from the compiled state its datapath uses.
// A connection is allowed only if both sides allow it: the source pod's
// egress and the destination pod's ingress (each judged by the node that
// hosts that pod).
//
// +kubebuilder:object:generate=false
type PolicyExplanation struct {
	// Verdict is TraceVerdictAllowed or TraceVerdictDenied for the side(s)
	// this answer covers.
	Verdict string `json:"verdict"`
	// Egress is the source pod's side, Ingress the destination pod's; a
	// side is nil when the answering node does not host that pod.
	Egress  *PolicyExplanationSide `json:"egress,omitempty"`
	Ingress *PolicyExplanationSide `json:"ingress,omitempty"`
}

// PolicyExplanationSide is one direction's decision.
//
// +kubebuilder:object:generate=false
type PolicyExplanationSide struct {
	// Node hosts the pod this side judges for.
	Node string `json:"node"`
	// Pod is namespace/name of the pod this side judges for.
	Pod string `json:"pod"`
	// Verdict is TraceVerdictAllowed or TraceVerdictDenied.
	Verdict string `json:"verdict"`
	// Reason is a TraceReason* value: policy (a rule allowed),
	// default-deny, not-enforced (no policy selects the pod this way), host.
	Reason string `json:"reason"`
	// Policy is the rule that allowed, or the policy whose default deny
	// applies.
	Policy *TracePolicy `json:"policy,omitempty"`
	// SelectedBy lists namespace/name of every policy selecting the pod in
	// this direction.
	SelectedBy []string `json:"selectedBy,omitempty"`
}

// TracePeer is one end of a flow: a pod where the IP is a known pod's,
// always the IP.
//
// +kubebuilder:object:generate=false
type TracePeer struct {
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod,omitempty"`
	IP        string `json:"ip"`
	Port      uint16 `json:"port,omitempty"`
}

// TraceProcess is the process that made the connection.
//
// +kubebuilder:object:generate=false
type TraceProcess struct {
	PID       uint32 `json:"pid,omitempty"`
	Command   string `json:"command,omitempty"`
	CgroupID  uint64 `json:"cgroupID,omitempty"`
	Container string `json:"container,omitempty"`
}

// TracePolicy names the policy that decided.
//
// +kubebuilder:object:generate=false
type TracePolicy struct {
	// Kind is NetworkPolicy (or L7Policy for l7 events).
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	// Rule is the index of the deciding rule in the policy's ingress or
	// egress list; nil for a default deny.
	Rule *int `json:"rule,omitempty"`
	// Unknown: the datapath named a policy ID the agent has no name for
	// (set only then); ID is that number.
	Unknown bool   `json:"unknown,omitempty"`
	ID      uint32 `json:"id,omitempty"`
}

// Where lost events were lost (TraceLost.Reason).
const (
	// TraceLostKernel: the kernel ring buffer was full; the datapath
	// decided but could not write the event.
	TraceLostKernel = "kernel-buffer-full"
	// TraceLostAgent: the agent's per-node buffer overwrote events before
	// a reader caught up (a client asking for the history got less).
	TraceLostAgent = "agent-buffer-overrun"
	// TraceLostSlowClient: this stream's client read slower than events
	// came; its queue was full.
	TraceLostSlowClient = "slow-client"
)

// TraceLost is a lost-events notice.
//
// +kubebuilder:object:generate=false
type TraceLost struct {
	// Time is when the agent noticed the loss.
	Time time.Time `json:"time"`
	Node string    `json:"node"`
	// Reason is one of the TraceLost* values.
	Reason string `json:"reason"`
	// Count is how many events were lost since the previous notice of the
	// same reason in this stream.
	Count uint64 `json:"count"`
	// Type is the event type whose source lost them, when known.
	Type string `json:"type,omitempty"`
}
