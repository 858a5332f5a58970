package socklb

import (
	"errors"
	"net/netip"
	"time"
)

// Proto is an IP protocol number as the kernel sees it in a socket.
type Proto uint8

// Protocols the socket LB translates (SCTP sockets are not built into every
// kernel; the map layout accepts it so the agent needs no special case).
const (
	TCP  Proto = 6
	UDP  Proto = 17
	SCTP Proto = 132
)

// Frontend is one address:port a client may connect to: a ClusterIP port,
// a NodePort on one node IP, or an ExternalIP port.
type Frontend struct {
	IP    netip.Addr
	Port  uint16
	Proto Proto
}

// Backend is one endpoint address:port a frontend translates to.
type Backend struct {
	IP   netip.Addr
	Port uint16
}

// Service is the complete datapath view of one Kubernetes Service port (one
// ServicePort of one Service), already resolved by the agent: Backends are the
// endpoints the datapath may pick (ready ones, else serving+terminating ones,
// already filtered for internalTrafficPolicy: Local). An empty Backends list
// means connect()/sendmsg() to any Frontend fails at once with ECONNREFUSED.
type Service struct {
	// ID is chosen by the agent, unique per Service port, never 0.
	ID uint32
	// Frontends all share the same backend set; each frontend's IP family
	// must equal its backends' family.
	Frontends []Frontend
	Backends  []Backend
	// AffinityTimeout > 0 enables sessionAffinity: ClientIP (per client
	// network namespace) for that long after the last connect.
	AffinityTimeout time.Duration
}

// ErrFull is returned (wrapped) when an Apply would exceed a map's capacity;
// nothing of that Apply has been written.
var ErrFull = errors.New("socket LB map full")

// Datapath is what the agent's service sync programs. The kernel
// implementation writes pinned BPF maps; tests use fakes with injected faults.
type Datapath interface {
	// Apply creates or replaces one service. Readers (the BPF programs) see
	// either the old or the new backend set for each frontend, never an
	// empty or torn one, and frontends removed from svc are deleted.
	Apply(svc Service) error
	// Delete removes a service and every frontend of it. Deleting an
	// unknown ID is not an error.
	Delete(id uint32) error
	// Capacity reports how many more frontends and backends fit.
	Capacity() (freeFrontends, freeBackends int)
}
