package local

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// The node's CNI lives at the standard paths, as on kind nodes, so
// `kubectl ebpf install` chains kebpf-cni with its defaults on both.
const (
	CNIConfDir = manifests.DefaultCNIConfDir
	CNIBinDir  = manifests.DefaultCNIBinDir
	// cniConfName sorts first: the runtime uses the first config by name.
	cniConfName = "10-kebpf.conflist"
)

// cniPlugins are linked from the Debian package into CNIBinDir.
var cniPlugins = []string{"bridge", "host-local", "loopback", "portmap"}

// installCNI writes our network config and links the plugins. A foreign
// config sorting before ours would silently take over the pods' network,
// so it is an error.
func (s *state) installCNI() error {
	if entries, err := os.ReadDir(CNIConfDir); err == nil {
		for _, e := range entries {
			n := e.Name()
			ext := filepath.Ext(n)
			if n < cniConfName && slices.Contains([]string{".conf", ".conflist", ".json"}, ext) {
				return fmt.Errorf("%s holds %s, which the runtime would use instead of our %s: move it away first", CNIConfDir, n, cniConfName)
			}
		}
	}
	if err := writeFile(filepath.Join(CNIConfDir, cniConfName), s.cniConfig()); err != nil {
		return err
	}
	if err := os.MkdirAll(CNIBinDir, 0o755); err != nil {
		return err
	}
	for _, p := range cniPlugins {
		dst := filepath.Join(CNIBinDir, p)
		src := filepath.Join("/usr/lib/cni", p)
		if t, err := os.Readlink(dst); err == nil && t == src {
			continue
		}
		if _, err := os.Lstat(dst); err == nil {
			return fmt.Errorf("%s exists and is not our link to %s: refusing to replace it", dst, src)
		}
		if err := os.Symlink(src, dst); err != nil {
			return err
		}
	}
	return nil
}

// removeCNI undoes installCNI (and what the agent may have chained), for
// hosts where the CNI dirs existed before; absent ones go whole.
func removeCNI() error {
	var errs []error
	rm := func(p string) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	rm(filepath.Join(CNIConfDir, cniConfName))
	// A conversion backup or temporary file of the agent's installer.
	if m, _ := filepath.Glob(filepath.Join(CNIConfDir, "*kebpf*")); len(m) > 0 {
		for _, f := range m {
			rm(f)
		}
	}
	for _, p := range cniPlugins {
		dst := filepath.Join(CNIBinDir, p)
		if t, err := os.Readlink(dst); err == nil && strings.HasPrefix(t, "/usr/lib/cni/") {
			rm(dst)
		}
	}
	rm(filepath.Join(CNIBinDir, "kebpf-cni"))
	return errors.Join(errs...)
}
