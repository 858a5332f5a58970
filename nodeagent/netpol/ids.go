package netpol

import (
	"sync"

	"k8s.io/apimachinery/pkg/types"
)

// IDs hands out the agent's numeric IDs: one per NetworkPolicy
// (namespace/name) for verdict attribution, one per local pod (UID) for its
// endpoint. IDs are never 0 and never reused within one agent process, so a
// counter or trace event read late never names the wrong policy.
type IDs struct {
	mu           sync.Mutex
	policies     map[string]uint32
	names        map[uint32]string
	endpoints    map[types.UID]uint32
	nextPolicy   uint32
	nextEndpoint uint32
}

// NewIDs returns an empty allocator.
func NewIDs() *IDs {
	return &IDs{
		policies:     map[string]uint32{},
		names:        map[uint32]string{},
		endpoints:    map[types.UID]uint32{},
		nextPolicy:   1,
		nextEndpoint: 1,
	}
}

// Policy returns the ID of namespace/name, assigning one on first use.
func (ids *IDs) Policy(namespace, name string) uint32 {
	key := namespace + "/" + name
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if id, ok := ids.policies[key]; ok {
		return id
	}
	id := ids.nextPolicy
	ids.nextPolicy++
	ids.policies[key] = id
	ids.names[id] = key
	return id
}

// PolicyName is the namespace/name of a policy ID, for attribution.
func (ids *IDs) PolicyName(id uint32) (string, bool) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	n, ok := ids.names[id]
	return n, ok
}

// PolicyNames is a copy of the ID -> namespace/name mapping.
func (ids *IDs) PolicyNames() map[uint32]string {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	out := make(map[uint32]string, len(ids.names))
	for id, n := range ids.names {
		out[id] = n
	}
	return out
}

// ReleasePolicy forgets a deleted policy; its ID is not handed out again.
func (ids *IDs) ReleasePolicy(namespace, name string) {
	key := namespace + "/" + name
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if id, ok := ids.policies[key]; ok {
		delete(ids.policies, key)
		delete(ids.names, id)
	}
}

// Endpoint returns the endpoint ID of a pod UID, assigning one on first use.
func (ids *IDs) Endpoint(uid types.UID) uint32 {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if id, ok := ids.endpoints[uid]; ok {
		return id
	}
	id := ids.nextEndpoint
	ids.nextEndpoint++
	ids.endpoints[uid] = id
	return id
}

// ReleaseEndpoint forgets a pod that is gone.
func (ids *IDs) ReleaseEndpoint(uid types.UID) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	delete(ids.endpoints, uid)
}

// AdoptEndpoint gives uid the ID a previous agent programmed for it (found
// pinned in the datapath), so a restart keeps endpoint IDs, counters and
// flows. False when uid already has another ID or id is taken.
func (ids *IDs) AdoptEndpoint(uid types.UID, id uint32) bool {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if id == 0 {
		return false
	}
	if have, ok := ids.endpoints[uid]; ok {
		return have == id
	}
	for _, have := range ids.endpoints {
		if have == id {
			return false
		}
	}
	ids.endpoints[uid] = id
	ids.nextEndpoint = max(ids.nextEndpoint, id+1)
	return true
}

// SkipEndpoints makes new endpoint IDs start above id: IDs a previous agent
// used are not handed to other pods.
func (ids *IDs) SkipEndpoints(id uint32) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.nextEndpoint = max(ids.nextEndpoint, id+1)
}
