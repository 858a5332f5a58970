package local

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
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

	// The bridge, kubepods cgroups and KUBE-* chains are host-wide: when this
	// cluster left no state but another one exists, they are that one's.
	if other := otherCluster(s); other != "" && !fileExists(s.dir) {
		fmt.Fprintf(log, "local: delete: no cluster %q (cluster %q owns the node); nothing to do\n", s.name, other)
		return nil
	}
	// The kubelet first, or it restarts the containers we kill.
	note(s.stop("kubelet", 15*time.Second))
	step("kubelet stopped")
	note(s.killContainers(ctx))
	step("containers killed")
	note(s.stop("containerd", 10*time.Second))
	for _, pid := range findProcs(func(argv []string) bool {
		return filepath.Base(argv[0]) == "containerd-shim-runc-v2" && hasArg(argv, s.sock)
	}) {
		note(killWait(pid, 2*time.Second))
	}
	step("containerd and shims stopped")

	_, kpErr := os.Stat(s.path("kube-proxy.enabled"))
	note(s.stop("kube-proxy", 5*time.Second))
	for _, n := range []string{"kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		note(s.stop(n, 10*time.Second))
	}
	// Processes whose pid file was lost (an interrupted Create) still name
	// our state dir or socket on their command line.
	for _, pid := range findProcs(func(argv []string) bool {
		return ourBinaries[filepath.Base(argv[0])] && (hasArgPrefix(argv, s.dir) || hasArg(argv, s.sock))
	}) {
		note(killWait(pid, 5*time.Second))
	}
	step("control plane and etcd stopped")

	if kpErr == nil || kubeChainsExist(ctx) {
		note(cleanupKubeProxy(ctx))
		step("kube-proxy rules removed")
	}
	for _, r := range s.containmentRules() {
		for i := 0; i < 10; i++ {
			if _, err := run(ctx, "iptables", ruleArgs("-D", r)...); err != nil {
				break
			}
		}
	}
	step("containment rules removed")

	note(s.removeNetworking(ctx))
	step("netns, veths and bridge removed")
	note(s.unmountAll())
	note(s.restoreMounts(ctx))
	step("mounts removed, propagation restored")
	note(removeKubepodsCgroups())
	step("kubepods cgroups removed")
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

// killContainers kills every container of our runc root, then every process
// left in a kubepods cgroup: shims outlive containerd, containers outlive
// their shims.
func (s *state) killContainers(ctx context.Context) error {
	var errs []error
	nss, _ := os.ReadDir(s.runcRoot)
	for _, ns := range nss {
		root := filepath.Join(s.runcRoot, ns.Name())
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
	for i := 0; i < 20; i++ {
		pids := kubepodsProcs()
		if len(pids) == 0 {
			return errors.Join(errs...)
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if pids := kubepodsProcs(); len(pids) > 0 {
		errs = append(errs, fmt.Errorf("processes survive in kubepods cgroups: %v", pids))
	}
	return errors.Join(errs...)
}

// kubepodsDirs lists every kubepods* cgroup directory in every hierarchy.
func kubepodsDirs() []string {
	var dirs []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods*")
	more, _ := filepath.Glob("/sys/fs/cgroup/kubepods*")
	for _, r := range append(roots, more...) {
		filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	return dirs
}

func kubepodsProcs() []int {
	seen := map[int]bool{}
	var pids []int
	for _, d := range kubepodsDirs() {
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

func removeKubepodsCgroups() error {
	dirs := kubepodsDirs()
	sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	var errs []error
	for _, d := range dirs {
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

func kubeChainsExist(ctx context.Context) bool {
	for _, bin := range []string{"iptables", "ip6tables"} {
		out, _ := exec.CommandContext(ctx, bin+"-save").Output()
		if strings.Contains(string(out), ":KUBE-") {
			return true
		}
	}
	out, _ := exec.CommandContext(ctx, "nft", "list", "tables").Output()
	return strings.Contains(string(out), "kube-proxy")
}

// cleanupKubeProxy runs kube-proxy's own cleanup, then removes every KUBE-*
// chain left (the kubelet's canary chains included) and the nftables tables.
func cleanupKubeProxy(ctx context.Context) error {
	var errs []error
	if bin := filepath.Join(k8sbin.BinDir(), "kube-proxy"); fileExists(bin) {
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		// --cleanup exits non-zero when some mode had nothing to remove.
		exec.CommandContext(cctx, bin, "--cleanup").Run()
		cancel()
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"filter", "nat", "mangle", "raw"} {
			out, err := exec.CommandContext(ctx, bin, "-w", "-t", table, "-S").Output()
			if err != nil {
				continue
			}
			var chains []string
			sc := bufio.NewScanner(strings.NewReader(string(out)))
			for sc.Scan() {
				f := splitRule(sc.Text())
				if len(f) >= 2 && f[0] == "-N" && strings.HasPrefix(f[1], "KUBE-") {
					chains = append(chains, f[1])
					continue
				}
				if len(f) >= 2 && f[0] == "-A" && !strings.HasPrefix(f[1], "KUBE-") && jumpsToKube(f) {
					args := append([]string{"-w", "-t", table, "-D"}, f[1:]...)
					if _, err := run(ctx, bin, args...); err != nil {
						errs = append(errs, err)
					}
				}
			}
			for _, c := range chains {
				run(ctx, bin, "-w", "-t", table, "-F", c)
			}
			for _, c := range chains {
				if _, err := run(ctx, bin, "-w", "-t", table, "-X", c); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	out, _ := exec.CommandContext(ctx, "nft", "list", "tables").Output()
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[0] == "table" && f[2] == "kube-proxy" {
			if _, err := run(ctx, "nft", "delete", "table", f[1], f[2]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func jumpsToKube(f []string) bool {
	for i := 0; i+1 < len(f); i++ {
		if (f[i] == "-j" || f[i] == "-g") && strings.HasPrefix(f[i+1], "KUBE-") {
			return true
		}
	}
	return false
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

// removeNetworking deletes the pod netns our runs made, the veths on the
// bridge and the bridge.
func (s *state) removeNetworking(ctx context.Context) error {
	var errs []error
	before := s.recordedNetns()
	for _, ns := range cniNetns() {
		if before[ns] {
			continue
		}
		// Without a record (state dir gone) only namespaces on our subnet.
		if len(before) == 0 && !fileExists(s.recordFile()) {
			out, _ := exec.CommandContext(ctx, "ip", "-n", ns, "-4", "-o", "addr").Output()
			if !strings.Contains(string(out), "10.244.0.") {
				continue
			}
		}
		if _, err := run(ctx, "ip", "netns", "delete", ns); err != nil {
			errs = append(errs, err)
		}
	}
	if linkExists(Bridge) {
		ents, _ := os.ReadDir(filepath.Join("/sys/class/net", Bridge, "brif"))
		for _, e := range ents {
			if _, err := run(ctx, "ip", "link", "delete", e.Name()); err != nil && linkExists(e.Name()) {
				errs = append(errs, err)
			}
		}
		if _, err := run(ctx, "ip", "link", "delete", Bridge); err != nil && linkExists(Bridge) {
			errs = append(errs, err)
		}
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
	// The kubelet links container logs from /var/log/containers into our
	// pod log dir.
	links, _ := filepath.Glob("/var/log/containers/*")
	for _, l := range links {
		if t, err := os.Readlink(l); err == nil && strings.HasPrefix(t, s.path("pod-logs")+"/") {
			os.Remove(l)
		}
	}
	results, _ := filepath.Glob("/var/lib/cni/results/kebpf-*")
	for _, r := range results {
		os.Remove(r)
	}
	os.RemoveAll("/var/lib/cni/networks/kebpf")
	if err := removeCNI(); err != nil {
		errs = append(errs, fmt.Errorf("remove CNI config: %w", err))
	}
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
