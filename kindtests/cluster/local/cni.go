package local

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// Each node's CNI lives at the standard paths inside the node (its mount
// namespace binds them to its own dirs), as on kind nodes, so `kubectl ebpf
// install` chains kebpf-cni with its defaults on both.
const (
	CNIConfDir = manifests.DefaultCNIConfDir
	CNIBinDir  = manifests.DefaultCNIBinDir
	// cniConfName sorts first: the runtime uses the first config by name.
	cniConfName = "10-kebpf.conflist"
)

// cniPlugins are linked from the Debian package into each node's bin dir.
var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

// linkCNIPlugins links the plugins into dir (a node's /opt/cni/bin).
func linkCNIPlugins(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, p := range cniPlugins {
		dst := filepath.Join(dir, p)
		src := filepath.Join("/usr/lib/cni", p)
		if t, err := os.Readlink(dst); err == nil && t == src {
			continue
		}
		if err := os.Symlink(src, dst); err != nil {
			return fmt.Errorf("link CNI plugin %s: %w", p, err)
		}
	}
	return nil
}
