package kind

import (
	"os/exec"
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
		if err := yaml.UnmarshalStrict([]byte(Config(tc.kubeProxy, 2)), &c); err != nil {
			t.Fatalf("kube-proxy %v: %v", tc.kubeProxy, err)
		}
		if c.Networking.KubeProxyMode != tc.mode || len(c.Nodes) != 2 {
			t.Errorf("kube-proxy %v: mode %q, %d nodes", tc.kubeProxy, c.Networking.KubeProxyMode, len(c.Nodes))
		}
	}
}

func TestMissingFromStatus(t *testing.T) {
	tests := []struct {
		name    string
		status  string
		want    uint64
		wantErr bool
	}{
		{"every capability", "Name:\tx\nCapBnd:\t000001ffffffffff\n", 0, false},
		{"newer kernel, more bits", "CapBnd:\t00000fffffffffff\n", 0, false},
		{"no CAP_SYS_RESOURCE (CI VMs)", "CapPrm:\t0\nCapBnd:\t000001fffeffffff\n", 1 << 24, false},
		{"empty set", "CapBnd:\t0000000000000000\n", 1<<41 - 1, false},
		{"no CapBnd line", "Name:\tx\n", 0, true},
		{"garbage", "CapBnd:\tzz\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := missingFromStatus(tt.status)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("missingFromStatus = %#x, %v; want %#x, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

// Kind must never be chosen where its privileged node containers cannot
// start; where it can be, the engine must answer.
func TestAvailable(t *testing.T) {
	missing, err := missingCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	avail := New().Available(t.Context())
	if missing != 0 && avail == nil {
		t.Fatalf("kind reported available on a host missing capabilities %#x", missing)
	}
	if avail != nil {
		t.Skipf("no container engine here can run privileged containers, so kind is not exercised: %v", avail)
	}
	e, err := engine()
	if err != nil {
		t.Fatalf("kind available but no engine: %v", err)
	}
	if out, err := exec.CommandContext(t.Context(), e, "version").CombinedOutput(); err != nil {
		t.Fatalf("kind available but %s version fails: %v\n%s", e, err, out)
	}
}
