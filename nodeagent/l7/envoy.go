package l7

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// isEnvoy reports whether p is an Envoy pod of our DaemonSet on node.
func isEnvoy(p *corev1.Pod, namespace, node string) bool {
	return p.Namespace == namespace && p.Spec.NodeName == node && p.Labels[manifests.LabelName] == manifests.EnvoyDaemonSetName
}

// podReady: the kubelet reports every container of the pod ready (Envoy's
// admin /ready, which turns LIVE after its first xDS config). The
// containers' readiness, which only the kubelet writes, not the pod's Ready
// condition: the node lifecycle controller sets that False on every pod of a
// node whose status it has not seen for a while (after an API server
// outage, until the kubelet reports again) while this node's Envoy answers
// all along. Following it stopped steering and failed L7 connections closed
// for a minute and a half after a 2-minute outage
// (TestIntegrationReliability).
//
// A pod being deleted counts while its containers are ready: it drains
// (preStop: connections are asked to close, its listeners still accept) and
// its replacement, which the DaemonSet starts at once (maxSurge), binds the
// same listener beside it (SO_REUSEPORT). Stopping at the deletion instead
// failed connects closed until the replacement was ready. Once its
// listeners close, connects go to the replacement, or, when there is none
// (the DaemonSet deleted), are refused until the kubelet reports the
// container gone: fail closed either way.
func podReady(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning || len(p.Status.ContainerStatuses) == 0 {
		return false
	}
	for _, cs := range p.Status.ContainerStatuses {
		if !cs.Ready {
			return false
		}
	}
	return true
}

// maxCgroupDepth bounds the search for a pod's cgroup: kubelet puts pods at
// <root>/kubepods[.slice]/<qos>/pod<uid> (cgroupfs) or
// kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice (systemd),
// possibly below a runtime's own cgroup (kind nodes).
const maxCgroupDepth = 6

// podCgroup finds the cgroup v2 directory of the pod with uid below root.
// The pod's cgroup, not its container's, is what the datapath exempts:
// it survives container restarts, and the datapath matches ancestors.
func podCgroup(root, uid string) (string, error) {
	if uid == "" {
		return "", errors.New("pod has no uid")
	}
	names := []string{"pod" + uid, "pod" + strings.ReplaceAll(uid, "-", "_")}
	var found string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == root {
				return err
			}
			return fs.SkipDir // a cgroup removed while walking
		}
		if !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		if rel != "." && strings.Count(rel, string(filepath.Separator)) >= maxCgroupDepth {
			return fs.SkipDir
		}
		base := d.Name()
		for _, n := range names {
			if base == n || strings.HasSuffix(base, "-"+n+".slice") {
				found = path
				return fs.SkipAll
			}
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("find cgroup of pod %s under %s: %w", uid, root, err)
	}
	if found == "" {
		return "", fmt.Errorf("no cgroup of pod %s under %s", uid, root)
	}
	return found, nil
}

// cgroupID is the cgroup v2 id of dir (its inode number), as the kernel's
// bpf_get_current_cgroup_id and ancestors report it.
func cgroupID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("stat %s: no inode", dir)
	}
	return st.Ino, nil
}
