// Package netpol is the L3/L4 NetworkPolicy datapath: tc programs on the host
// side of each local pod's interface, a connection-tracking table so an
// established flow costs one lookup per packet, and per-endpoint policy maps
// whose lookup cost does not depend on how many policies, pods or CIDRs exist.
//
// Peers are matched by IP, not by a label identity: the agent expands pod and
// namespace selectors into pod IPs and ipBlocks into prefixes, and the map is
// an LPM trie keyed by (endpoint, direction, generation, peer prefix). That
// keeps the datapath free of an IP->identity cache that would have to be kept
// in sync on every node for every pod of the cluster, at the price of more
// entries when a policy names a large namespace; see the package README.
package netpol

import (
	"errors"
	"net/netip"
)

// Direction is relative to the pod.
type Direction uint8

const (
	// Ingress is traffic to the pod (the host-side interface's egress).
	Ingress Direction = 0
	// Egress is traffic from the pod (the host-side interface's ingress).
	Egress Direction = 1
)

// Proto is an IP protocol number; 0 matches every protocol.
type Proto uint8

const (
	AnyProto Proto = 0
	TCP      Proto = 6
	UDP      Proto = 17
	SCTP     Proto = 132
)

// MaxRulesPerPrefix bounds the port rules one peer prefix may carry, so a
// new flow's verdict costs one LPM lookup plus a bounded scan.
const MaxRulesPerPrefix = 16

// PortRule allows one protocol and port range. PortLo == PortHi == 0 allows
// every port (of Proto; of every protocol when Proto is AnyProto).
type PortRule struct {
	Proto  Proto
	PortLo uint16
	PortHi uint16
	// PolicyID and Rule name the policy (agent-assigned ID, never 0) and the
	// index of its ingress/egress rule that allowed the flow, for attribution.
	PolicyID uint32
	Rule     uint16
}

// PeerEntry allows Rules to/from every address in Prefix. Within one
// endpoint and direction the longest matching prefix decides alone: the
// compiler copies the rules of covering prefixes into more specific ones, and
// an ipBlock `except` becomes a more specific prefix with no rules.
type PeerEntry struct {
	Prefix netip.Prefix
	Rules  []PortRule
}

// EndpointPolicy is the complete policy of one local pod.
type EndpointPolicy struct {
	// ID is the agent's endpoint ID, unique per local pod, never 0.
	ID uint32
	// IfIndex is the host-side interface of the pod.
	IfIndex int
	IPs     []netip.Addr
	// IngressEnforced / EgressEnforced: some policy selects the pod in that
	// direction, so traffic not allowed by a PeerEntry is dropped.
	IngressEnforced bool
	EgressEnforced  bool
	// DefaultDenyPolicy names a policy that selects the pod, reported as the
	// decider of default-deny verdicts.
	DefaultDenyPolicy uint32
	Ingress           []PeerEntry
	Egress            []PeerEntry
}

// ErrFull is returned (wrapped) when an apply would exceed a map's capacity;
// nothing of it has been written.
var ErrFull = errors.New("network policy map full")

// Datapath is what the agent's policy compiler programs; the kernel
// implementation writes pinned maps and attaches tc programs, tests use fakes.
type Datapath interface {
	// ApplyEndpoint replaces the policy of one endpoint atomically: packets
	// see the old or the new policy, never a mix.
	ApplyEndpoint(p EndpointPolicy) error
	// DeleteEndpoint removes an endpoint's policy and detaches its programs.
	DeleteEndpoint(id uint32) error
	// SetHostIPs sets the node's own addresses: traffic between the node and
	// its pods (kubelet probes) is always allowed.
	SetHostIPs(ips []netip.Addr) error
}
