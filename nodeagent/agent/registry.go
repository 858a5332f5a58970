//go:build linux

package agent

import (
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Registration is everything the agent knows of one datapath feature. Each
// feature registers itself from its own file (init), so adding a feature is
// one new file plus its name in apiv1.KnownFeatures; the agent's lifecycle
// (converge, NodeState, readiness) is the same for all of them.
type Registration struct {
	// Name is the feature's apiv1.Feature* name.
	Name string
	// Kernel lists the kernel probes (nodeagent/features names) the feature
	// cannot run without under cfg; the agent checks them before every
	// Enable and reports the missing ones as the feature's error.
	Kernel func(cfg *Config) []string
	// NeedsAPI: the feature watches the API server, so an agent without a
	// client (tests, bare runs) leaves it out.
	NeedsAPI bool
	// New builds the feature for a, registering its metrics in reg. Its
	// Disable also removes whatever an earlier agent pinned (uninstall's
	// cleanup pod removes everything else of this node: what its pins and
	// its cgroup root reach, see nodeagent/cleanup).
	New func(a *Agent, reg prometheus.Registerer) Feature
}

var registry = map[string]Registration{}

// register adds a feature; a name outside apiv1.KnownFeatures, or one
// registered twice, is a programming error caught at start-up.
func register(r Registration) {
	if !slices.Contains(apiv1.KnownFeatures, r.Name) {
		panic(fmt.Sprintf("agent: feature %q is not in apiv1.KnownFeatures", r.Name))
	}
	if _, dup := registry[r.Name]; dup {
		panic(fmt.Sprintf("agent: feature %q registered twice", r.Name))
	}
	registry[r.Name] = r
}

// registered returns the registrations in apiv1.KnownFeatures order, the
// order the agent enables them in.
func registered() []Registration {
	var out []Registration
	for _, name := range apiv1.KnownFeatures {
		if r, ok := registry[name]; ok {
			out = append(out, r)
		}
	}
	return out
}
