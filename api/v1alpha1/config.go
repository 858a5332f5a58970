package v1alpha1

import (
	"bytes"
	"fmt"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"
)

// ConfigKey is the key of the ConfigMap kubectl-ebpf-config holding the
// cluster-wide agent config.
const ConfigKey = "config.yaml"

// The datapath features an agent can switch on and off: the names users type
// (`kubectl ebpf enable NAME`), the keys of AgentConfig.Features and the
// entries of NodeStateStatus.Active. The one place these names are spelled.
const (
	// FeatureSockStats counts socket creations (cgroup/sock_create).
	FeatureSockStats = "sockstats"
	// FeatureServiceLB is connect-time service load balancing.
	FeatureServiceLB = "service-lb"
	// FeaturePolicy is L3/L4 NetworkPolicy enforcement.
	FeaturePolicy = "policy"
	// FeatureL7 steers connections to pods an L7Policy selects through the
	// node's Envoy (sockmap) and serves that Envoy its config over xDS.
	FeatureL7 = "l7"
)

// KnownFeatures are the datapath features an agent can switch on and off,
// in the order agents attach them. l7 comes after service-lb: its connect
// program must run after the socket LB's at the same cgroup, so it sees the
// backend the LB chose (bpf/sockmap README).
var KnownFeatures = []string{FeatureSockStats, FeatureServiceLB, FeaturePolicy, FeatureL7}

// DefaultOffFeatures are the known features `install` leaves disabled:
// l7 runs a second DaemonSet (Envoy) and changes the path of selected
// connections, so users opt in with `kubectl ebpf enable l7`.
var DefaultOffFeatures = []string{FeatureL7}

// AgentConfig is the cluster-wide agent config, stored as YAML under ConfigKey
// of the ConfigMap kubectl-ebpf-config.
//
// +kubebuilder:object:generate=false
type AgentConfig struct {
	// Features maps a feature name to whether agents attach it. A feature
	// missing from the map is disabled.
	Features map[string]bool `json:"features"`
}

// DefaultConfig enables every known feature but DefaultOffFeatures, which
// it lists as disabled; `install` writes it.
func DefaultConfig() AgentConfig {
	c := AgentConfig{Features: make(map[string]bool, len(KnownFeatures))}
	for _, f := range KnownFeatures {
		c.Features[f] = !slices.Contains(DefaultOffFeatures, f)
	}
	return c
}

// ParseConfig parses and validates a config.yaml. Unknown fields and unknown
// feature names are errors: a typo must not silently switch a feature off.
func ParseConfig(data []byte) (AgentConfig, error) {
	var c AgentConfig
	if len(bytes.TrimSpace(data)) == 0 {
		return AgentConfig{}, fmt.Errorf("parse %s: empty", ConfigKey)
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return AgentConfig{}, fmt.Errorf("parse %s: %w", ConfigKey, err)
	}
	var unknown []string
	for name := range c.Features {
		if !slices.Contains(KnownFeatures, name) {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		return AgentConfig{}, fmt.Errorf("parse %s: unknown feature(s) %s (known: %s)", ConfigKey,
			strings.Join(unknown, ", "), strings.Join(KnownFeatures, ", "))
	}
	if c.Features == nil {
		c.Features = map[string]bool{}
	}
	return c, nil
}

// Enabled reports whether feature is switched on.
func (c AgentConfig) Enabled(feature string) bool { return c.Features[feature] }

// Marshal renders the config as config.yaml content (keys sorted, so the
// same config always yields the same bytes and patches stay no-ops).
func (c AgentConfig) Marshal() ([]byte, error) {
	if c.Features == nil {
		c.Features = map[string]bool{}
	}
	b, err := yaml.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("marshal %s: %w", ConfigKey, err)
	}
	return b, nil
}
