package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ourBinaries are the base names of processes a cluster runs; leftover
// processes are only killed when they are one of these.
var ourBinaries = map[string]bool{
	"etcd": true, "containerd": true, "containerd-shim-runc-v2": true, "kube-apiserver": true,
	"kube-controller-manager": true, "kube-scheduler": true, "kubelet": true, "kube-proxy": true,
}

// Delete implements cluster.Provider. Every step runs even when an earlier
// one fails, so a half-created or half-deleted cluster is always cleaned.
func (*Provider) Delete(ctx context.Context, name string, log io.Writer) error {
	if log == nil {
		log = io.Discard
	}
	s := newState(name)
	start := time.Now()
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
			fmt.Fprintf(log, "local: delete: %v\n", err)
		}
	}
	step := func(what string) {
		fmt.Fprintf(log, "local: delete: %-40s (%5.1fs)\n", what, time.Since(start).Seconds())
	}

	// The bridge and node namespaces have fixed names: when this cluster
	// left no state but another one exists, they are that one's.
	if other := otherCluster(s); other != "" && !fileExists(s.dir) {
		fmt.Fprintf(log, "local: delete: no cluster %q (cluster %q owns the node); nothing to do\n", s.name, other)
		return nil
	}
	for _, n := range s.nodesToDelete() {
		for _, err := range s.deleteNode(ctx, n) {
			note(err)
		}
		step("node " + n.Name + " removed")
	}
	for _, n := range []string{"kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		note(s.stop(n, 10*time.Second))
	}
	// Processes whose pid file was lost (an interrupted Create) still name
	// our state dir on their command line.
	for _, pid := range findProcs(func(argv []string) bool {
		return ourBinaries[filepath.Base(argv[0])] && hasArgPrefix(argv, s.dir)
	}) {
		note(killWait(pid, 5*time.Second))
	}
	step("control plane and etcd stopped")

	for _, r := range s.containmentRules() {
		for i := 0; i < 10; i++ {
			if _, err := run(ctx, "iptables", ruleArgs("-D", r)...); err != nil {
				break
			}
		}
	}
	step("containment rules removed")
	note(removeBridge(ctx))
	step("node network removed")
	note(s.unmountAll())
	note(s.restoreMounts(ctx))
	step("mounts removed, propagation restored")
	for _, err := range s.restoreSysctls() {
		note(err)
	}
	step("sysctls restored")
	note(s.removeFiles())
	step("state removed")
	if len(errs) > 0 {
		return fmt.Errorf("delete local cluster %q: %w", s.name, errors.Join(errs...))
	}
	return nil
}

// nodesToDelete are the nodes with state plus any node whose netns or
// cgroup an interrupted Create left before writing its state.
func (s *state) nodesToDelete() []node {
	nodes := s.nodes()
	for i := 0; i < MaxNodes; i++ {
		n := node{Index: i, Name: nodeName(i)}
		if hasNode(nodes, n.Name) {
			continue
		}
		dirs, _ := nodeCgroups(n)
		_, nsErr := os.Stat("/run/netns/" + n.netns())
		leftover := nsErr == nil || linkExists(n.hostVeth())
		for _, d := range dirs {
			leftover = leftover || fileExists(d)
		}
		if leftover {
			nodes = append(nodes, n)
		}
	}
	return nodes
}

// deleteNode stops node n's processes (the kubelet first, or it restarts
// the containers we kill), kills whatever is left in its cgroups, and
// removes its cgroups and netns; its mount namespace goes with its last
// process.
func (s *state) deleteNode(ctx context.Context, n node) []error {
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", n.Name, err))
		}
	}
	note(s.stop(kubeletComponent(n), 15*time.Second))
	note(s.killContainers(ctx, n))
	note(s.stop(containerdComponent(n), 10*time.Second))
	sock := s.nodeSock(n)
	for _, pid := range findProcs(func(argv []string) bool {
		return filepath.Base(argv[0]) == "containerd-shim-runc-v2" && hasArg(argv, sock)
	}) {
		note(killWait(pid, 2*time.Second))
	}
	note(s.stop(kubeProxyComponent(n), 5*time.Second))
	note(s.stop(holderComponent(n), 2*time.Second))
	note(killCgroupProcs(n))
	note(removeCgroups(n))
	if _, err := os.Stat("/run/netns/" + n.netns()); err == nil {
		if _, err := run(ctx, "ip", "netns", "delete", n.netns()); err != nil {
			note(err)
		}
	}
	if linkExists(n.hostVeth()) {
		if _, err := run(ctx, "ip", "link", "delete", n.hostVeth()); err != nil && linkExists(n.hostVeth()) {
			note(err)
		}
	}
	return errs
}

// otherCluster names another local cluster with a state dir, if any.
func otherCluster(s *state) string {
	ents, _ := os.ReadDir(filepath.Dir(s.dir))
	for _, e := range ents {
		if e.IsDir() && e.Name() != s.name && filepath.Join(filepath.Dir(s.dir), e.Name()) != s.dir {
			return e.Name()
		}
	}
	return ""
}

func hasArg(argv []string, a string) bool {
	for _, x := range argv {
		if x == a || strings.HasSuffix(x, "="+a) || x == "unix://"+a {
			return true
		}
	}
	return false
}

func hasArgPrefix(argv []string, dir string) bool {
	for _, x := range argv[1:] {
		if _, v, ok := strings.Cut(x, "="); ok && strings.HasPrefix(v, dir) {
			return true
		}
		if x == dir || strings.HasPrefix(x, dir+"/") {
			return true
		}
	}
	return false
}

// killContainers kills every container of node n's runc root: shims outlive
// containerd, containers outlive their shims.
func (s *state) killContainers(ctx context.Context, n node) error {
	runcRoot := s.nodeRuncRoot(n)
	nss, _ := os.ReadDir(runcRoot)
	for _, ns := range nss {
		root := filepath.Join(runcRoot, ns.Name())
		ids, _ := os.ReadDir(root)
		for _, id := range ids {
			run(ctx, "runc", "--root", root, "kill", "--all", id.Name(), "KILL")
		}
		for _, id := range ids {
			for i := 0; i < 20; i++ {
				if _, err := run(ctx, "runc", "--root", root, "delete", "--force", id.Name()); err == nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	return nil
}

// cgroupTree lists node n's cgroup directories in every hierarchy, deepest
// first.
func cgroupTree(n node) []string {
	roots, _ := nodeCgroups(n)
	var dirs []string
	for _, r := range roots {
		filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	sort.SliceStable(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	return dirs
}

func cgroupProcs(dirs []string) []int {
	seen := map[int]bool{}
	var pids []int
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && !seen[pid] && pid != os.Getpid() {
				seen[pid] = true
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// killCgroupProcs kills every process left in node n's cgroups: a node
// is gone only when nothing runs in it.
func killCgroupProcs(n node) error {
	for i := 0; i < 25; i++ {
		pids := cgroupProcs(cgroupTree(n))
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if pids := cgroupProcs(cgroupTree(n)); len(pids) > 0 {
		return fmt.Errorf("processes survive in the node's cgroups: %v", pids)
	}
	return nil
}

// removeCgroups removes node n's cgroup trees, deepest first (an emptied
// cgroup can take a moment to become removable).
func removeCgroups(n node) error {
	var errs []error
	for _, d := range cgroupTree(n) {
		var err error
		for i := 0; i < 10; i++ {
			if err = syscall.Rmdir(d); err == nil || errors.Is(err, syscall.ENOENT) {
				err = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// splitRule splits an `iptables -S` line, honouring its double quotes.
func splitRule(l string) []string {
	var out []string
	var cur strings.Builder
	inQ, has := false, false
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case c == '\\' && inQ && i+1 < len(l):
			i++
			cur.WriteByte(l[i])
		case c == '"':
			inQ = !inQ
			has = true
		case c == ' ' && !inQ:
			if has || cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
				has = false
			}
		default:
			cur.WriteByte(c)
		}
	}
	if has || cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// removeBridge deletes the node network's bridge and any veth still on it.
func removeBridge(ctx context.Context) error {
	if !linkExists(Bridge) {
		return nil
	}
	var errs []error
	ents, _ := os.ReadDir(filepath.Join("/sys/class/net", Bridge, "brif"))
	for _, e := range ents {
		if _, err := run(ctx, "ip", "link", "delete", e.Name()); err != nil && linkExists(e.Name()) {
			errs = append(errs, err)
		}
	}
	if _, err := run(ctx, "ip", "link", "delete", Bridge); err != nil && linkExists(Bridge) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// mountsUnder lists mount points at or below any of dirs, deepest first.
func mountsUnder(dirs ...string) []string {
	mounts, err := readMountinfo()
	if err != nil {
		return nil
	}
	var mps []string
	for _, m := range mounts {
		for _, d := range dirs {
			if m.point == d || strings.HasPrefix(m.point, d+"/") {
				mps = append(mps, m.point)
				break
			}
		}
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	return mps
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (s *state) unmountAll() error {
	for round := 0; round < 5; round++ {
		mps := mountsUnder(s.dir, s.runDir)
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	}
	if mps := mountsUnder(s.dir, s.runDir); len(mps) > 0 {
		return fmt.Errorf("still mounted: %s", strings.Join(mps, ", "))
	}
	return nil
}

func (s *state) removeFiles() error {
	var errs []error
	if rec, ok := s.readRecord(); ok {
		for _, p := range rec.Absent {
			if len(mountsUnder(p)) > 0 {
				errs = append(errs, fmt.Errorf("keep %s: still mounted", p))
				continue
			}
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", p, err))
			}
		}
	}
	if mps := mountsUnder(s.dir, s.runDir); len(mps) > 0 {
		// Never recurse into a live mount (a pod volume could be a host dir).
		return fmt.Errorf("keep %s: still mounted: %s", s.dir, strings.Join(mps, ", "))
	}
	for _, d := range []string{s.dir, s.runDir} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", d, err))
		}
	}
	os.Remove(filepath.Dir(s.runDir))
	os.Remove(filepath.Dir(s.dir))
	return errors.Join(errs...)
}
