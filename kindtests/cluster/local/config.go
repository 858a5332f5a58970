package local

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

func writeFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// containerdConfig is node n's own containerd instance: own socket, root,
// state and runc root, so it never touches a host containerd or another
// node's and teardown can find everything it made. The CNI dirs are the
// standard paths, which the node's mount namespace binds to its own.
func (s *state) containerdConfig(n node) string {
	return fmt.Sprintf(`version = 2
root = %q
state = %q
oom_score = 0

[grpc]
  address = %q

[ttrpc]
  address = ""

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  # The VM withholds CAP_SYS_RESOURCE even from root; without this runc
  # fails every pod with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  sandbox_image = %q
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # systemd is not PID 1 here.
        SystemdCgroup = false
        Root = %q

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
`, s.nodeDir(n, "containerd", "root"), s.nodeDir(n, "containerd", "state"), s.nodeSock(n), s.nodeDir(n, "containerd", "opt"),
		PauseImage, s.nodeRuncRoot(n), CNIBinDir, CNIConfDir)
}

// cniConfig is node n's pod network: a bridge in the node's netns with the
// node's pod CIDR; other nodes' pods are reached through the node's routes.
func (s *state) cniConfig(n node) string {
	return fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "kebpf",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "gateway": %q}]]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, PodBridge, "/var/lib/cni/networks", n.PodCIDR(), n.PodGateway())
}

func (s *state) kubeletConfig(n node) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %s
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
podLogsDir: /var/log/pods
resolvConf: /etc/resolv.conf
clusterDomain: %s
clusterDNS: [%s]
protectKernelDefaults: false
serializeImagePulls: false
rotateCertificates: false
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%%
  nodefs.inodesFree: 1%%
  imagefs.available: 1%%
  imagefs.inodesFree: 1%%
`, n.IP(), s.path("pki", "ca.crt"), s.nodeSock(n), ClusterDomain, DNSServiceIP)
}

// kubeProxyConfig programs node ports only on the node's address.
func (s *state) kubeProxyConfig(n node) string {
	return k8sbin.KubeProxy{Kubeconfig: s.path("kube-proxy.kubeconfig"), Mode: "iptables", Hostname: n.Name,
		NodeIP: n.IP(), BindAddress: n.IP(), ClusterCIDR: ClusterPodCIDR}.Config()
}
