package k8sbin

import (
	"fmt"
	"strings"
)

// KubeProxy is what differs between the kube-proxy configs of the local
// cluster and of the bench.
type KubeProxy struct {
	Kubeconfig string
	Mode       string // iptables or nftables
	Hostname   string
	// NodeIP is the only address node ports are programmed on.
	NodeIP string
	// BindAddress and ClusterCIDR are left to kube-proxy when empty.
	BindAddress, ClusterCIDR string
}

// Config is the KubeProxyConfiguration for k. It leaves the host's
// conntrack sysctls alone (zero sizes and timeouts mean "do not set"; some
// are global to the host), programs node ports only on NodeIP and keeps
// route_localnet untouched (localhostNodePorts: false); everything else is
// kube-proxy's default, minSyncPeriod included.
func (k KubeProxy) Config() string {
	var opt strings.Builder
	if k.BindAddress != "" {
		fmt.Fprintf(&opt, "bindAddress: %s\n", k.BindAddress)
	}
	if k.ClusterCIDR != "" {
		fmt.Fprintf(&opt, "clusterCIDR: %s\n", k.ClusterCIDR)
	}
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %s
mode: %s
hostnameOverride: %s
%shealthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["%s/32"]
iptables:
  localhostNodePorts: false
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
`, k.Kubeconfig, k.Mode, k.Hostname, opt.String(), k.NodeIP)
}
