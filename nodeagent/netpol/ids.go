package netpol

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"k8s.io/apimachinery/pkg/types"
)

// IDs hands out the agent's numeric IDs: one per NetworkPolicy
// (namespace/name) for verdict attribution, one per local pod (UID) for its
// endpoint. IDs are never 0 and never reused within one agent process, so a
// counter or trace event read late never names the wrong policy.
//
// With a state file (LoadIDs) the policy IDs also survive an agent restart:
// the pinned conntrack, verdict and ring-buffer records a previous agent's
// datapath wrote carry its policy IDs, and the trace must name them. The
// file lives as long as the pins should (a tmpfs under /run: a reboot clears
// both), is rewritten (write + rename) whenever a policy gets or loses an
// ID, and keeps the names of the last MaxRetiredPolicies deleted policies,
// so an event read just after a deletion is still named.
type IDs struct {
	mu           sync.Mutex
	policies     map[string]uint32
	names        map[uint32]string
	retired      map[uint32]string // deleted policies, still named
	endpoints    map[types.UID]uint32
	nextPolicy   uint32
	nextEndpoint uint32

	path    string // state file; "" keeps nothing
	dirty   bool   // the file lags behind
	saveErr error  // last save's error
}

// MaxRetiredPolicies is how many deleted policies keep their names.
const MaxRetiredPolicies = 4096

// idsFile is the state file's content.
type idsFile struct {
	Version    int               `json:"version"`
	NextPolicy uint32            `json:"nextPolicy"`
	Policies   map[string]uint32 `json:"policies"` // namespace/name -> ID
	Retired    map[string]string `json:"retired"`  // ID -> namespace/name
}

// LoadIDs returns an allocator persisting its policy IDs to path, starting
// from what path holds (a missing file is an empty start). An unreadable
// file is an error: starting afresh would give old IDs new meanings.
func LoadIDs(path string) (*IDs, error) {
	ids := NewIDs()
	ids.path = path
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return ids, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read policy IDs: %w", err)
	}
	var f idsFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("read policy IDs %s: %w", path, err)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("read policy IDs %s: version %d, want 1", path, f.Version)
	}
	ids.nextPolicy = max(f.NextPolicy, 1)
	for name, id := range f.Policies {
		if id == 0 {
			continue
		}
		ids.policies[name] = id
		ids.names[id] = name
		ids.nextPolicy = max(ids.nextPolicy, id+1)
	}
	for k, name := range f.Retired {
		id, err := strconv.ParseUint(k, 10, 32)
		if err != nil || id == 0 {
			continue
		}
		ids.retired[uint32(id)] = name
		ids.nextPolicy = max(ids.nextPolicy, uint32(id)+1)
	}
	return ids, nil
}

// saveLocked marks the state file out of date; ids.mu must be held.
func (ids *IDs) saveLocked() { ids.dirty = ids.path != "" }

// Save rewrites the state file if an ID was assigned or released since the
// last Save. The sync calls it before writing an endpoint to the datapath,
// so no ID reaches the maps unrecorded, and a full sync assigning thousands
// of IDs writes the file once per endpoint at most, not once per ID. A
// failure is kept for Err and retried at the next Save.
func (ids *IDs) Save() error {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	if !ids.dirty {
		return ids.saveErr
	}
	f := idsFile{Version: 1, NextPolicy: ids.nextPolicy, Policies: ids.policies, Retired: map[string]string{}}
	for id, n := range ids.retired {
		f.Retired[strconv.FormatUint(uint64(id), 10)] = n
	}
	ids.saveErr = writeFileAtomic(ids.path, f)
	ids.dirty = ids.saveErr != nil
	return ids.saveErr
}

func writeFileAtomic(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("save policy IDs: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("save policy IDs: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".policy-ids-*")
	if err != nil {
		return fmt.Errorf("save policy IDs: %w", err)
	}
	_, err = tmp.Write(b)
	err = errors.Join(err, tmp.Close())
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("save policy IDs %s: %w", path, err)
	}
	return nil
}

// Err is the last state-file save's error, nil when it worked.
func (ids *IDs) Err() error {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	return ids.saveErr
}

// NewIDs returns an empty allocator.
func NewIDs() *IDs {
	return &IDs{
		policies:     map[string]uint32{},
		names:        map[uint32]string{},
		retired:      map[uint32]string{},
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
	ids.saveLocked()
	return id
}

// PolicyName is the namespace/name of a policy ID, for attribution; a
// recently deleted policy's ID still has its name.
func (ids *IDs) PolicyName(id uint32) (string, bool) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	n, ok := ids.names[id]
	if !ok {
		n, ok = ids.retired[id]
	}
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
		ids.retired[id] = key
		if len(ids.retired) > MaxRetiredPolicies {
			// IDs grow: the lowest are the oldest deletions.
			old := slices.Sorted(maps.Keys(ids.retired))
			for _, r := range old[:len(old)-MaxRetiredPolicies] {
				delete(ids.retired, r)
			}
		}
		ids.saveLocked()
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

// SkipPolicies makes new policy IDs start above id (an allocator that lost
// its state file starts above every ID the old one can have used).
func (ids *IDs) SkipPolicies(id uint32) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.nextPolicy = max(ids.nextPolicy, id+1)
	ids.saveLocked()
}

// SkipEndpoints makes new endpoint IDs start above id: IDs a previous agent
// used are not handed to other pods.
func (ids *IDs) SkipEndpoints(id uint32) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	ids.nextEndpoint = max(ids.nextEndpoint, id+1)
}
