package k8sbin

import (
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestKubeProxyConfig(t *testing.T) {
	for _, k := range []KubeProxy{
		{Kubeconfig: "/kc", Mode: "nftables", Hostname: "node-a", NodeIP: "10.0.0.1"},
		{Kubeconfig: "/kc", Mode: "iptables", Hostname: "node-a", NodeIP: "10.0.0.1", BindAddress: "10.0.0.1", ClusterCIDR: "10.244.0.0/24"},
	} {
		var c map[string]any
		if err := yaml.UnmarshalStrict([]byte(k.Config()), &c); err != nil {
			t.Fatalf("%+v: %v\n%s", k, err, k.Config())
		}
		if c["mode"] != k.Mode || c["hostnameOverride"] != k.Hostname || c["clusterCIDR"] != nilIfEmpty(k.ClusterCIDR) ||
			c["bindAddress"] != nilIfEmpty(k.BindAddress) || !strings.Contains(k.Config(), `nodePortAddresses: ["10.0.0.1/32"]`) {
			t.Errorf("%+v: config %v", k, c)
		}
		if ct := c["conntrack"].(map[string]any); ct["maxPerCore"] != float64(0) || ct["udpTimeout"] != "0s" {
			t.Errorf("%+v: conntrack %v (must leave the host's sysctls alone)", k, ct)
		}
	}
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}
