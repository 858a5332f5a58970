package local

import (
	"net/netip"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestDNSConfig(t *testing.T) {
	prefix := netip.MustParsePrefix(ServiceCIDR)
	tenth := prefix.Addr()
	for i := 0; i < 10; i++ {
		tenth = tenth.Next()
	}
	if DNSServiceIP != tenth.String() {
		t.Errorf("DNSServiceIP = %s, want the 10th address of %s (%s)", DNSServiceIP, ServiceCIDR, tenth)
	}

	var kc struct {
		ClusterDNS    []string `json:"clusterDNS"`
		ClusterDomain string   `json:"clusterDomain"`
	}
	s := newState("unit")
	n := planNodes(1)[0]
	if err := yaml.Unmarshal([]byte(s.kubeletConfig(n)), &kc); err != nil {
		t.Fatalf("kubelet config: %v\n%s", err, s.kubeletConfig(n))
	}
	if len(kc.ClusterDNS) != 1 || kc.ClusterDNS[0] != DNSServiceIP || kc.ClusterDomain != ClusterDomain {
		t.Errorf("kubelet clusterDNS %v clusterDomain %q, want [%s] %s", kc.ClusterDNS, kc.ClusterDomain, DNSServiceIP, ClusterDomain)
	}

	// Nothing is reachable off this machine: a forward would turn every
	// outside lookup into a client timeout instead of a fast REFUSED.
	if strings.Contains(corefile, "forward") || strings.Contains(corefile, ".:53") {
		t.Errorf("Corefile must answer only the cluster's zones:\n%s", corefile)
	}

	_, _, _, cm, dep, svc := dnsObjects()
	if cm.Data["Corefile"] != corefile || cm.Name != dep.Spec.Template.Spec.Volumes[0].ConfigMap.Name {
		t.Errorf("the Deployment does not mount the Corefile ConfigMap")
	}
	if svc.Name != "kube-dns" || svc.Namespace != "kube-system" || svc.Spec.ClusterIP != DNSServiceIP {
		t.Errorf("service %s/%s %s", svc.Namespace, svc.Name, svc.Spec.ClusterIP)
	}
	ports := map[string]string{}
	for _, p := range svc.Spec.Ports {
		ports[p.Name] = string(p.Protocol) + "/" + p.TargetPort.String()
	}
	if ports["dns"] != "UDP/dns" || ports["dns-tcp"] != "TCP/dns-tcp" || len(ports) != 2 {
		t.Errorf("kube-dns ports %v", ports)
	}
	c := dep.Spec.Template.Spec.Containers[0]
	if c.Image != CoreDNSImage || c.ImagePullPolicy != "Never" {
		t.Errorf("container image %s pull %s: nothing can be pulled here", c.Image, c.ImagePullPolicy)
	}
}
