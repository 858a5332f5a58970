package kind

import (
	"testing"

	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/yaml"
)

// The config must be one kind accepts: it is only exercised for real on
// machines with a container engine, so parse it here with kind's own types.
func TestConfigParses(t *testing.T) {
	for _, tc := range []struct {
		kubeProxy bool
		mode      v1alpha4.ProxyMode
	}{{true, v1alpha4.IPTablesProxyMode}, {false, "none"}} {
		var c v1alpha4.Cluster
		if err := yaml.UnmarshalStrict([]byte(Config(tc.kubeProxy)), &c); err != nil {
			t.Fatalf("kube-proxy %v: %v", tc.kubeProxy, err)
		}
		if c.Networking.KubeProxyMode != tc.mode || len(c.Nodes) != 2 {
			t.Errorf("kube-proxy %v: mode %q, %d nodes", tc.kubeProxy, c.Networking.KubeProxyMode, len(c.Nodes))
		}
	}
}

func TestMissingCapabilities(t *testing.T) {
	missing, err := missingCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	// Report what this host lacks; kind must not be chosen where it lacks any.
	t.Logf("capabilities missing from the bounding set: %#x", missing)
	if missing != 0 {
		p := New()
		if err := p.Available(t.Context()); err == nil {
			t.Errorf("kind reported available on a host missing capabilities %#x", missing)
		}
	}
}
