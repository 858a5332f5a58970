package local

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// A node of the local cluster is what a kind node container is, without the
// container image: its own network namespace (an address on the node
// network, its own pod bridge and pod CIDR, its own iptables for
// kube-proxy), its own mount namespace (its own bpffs instance, kubelet,
// CNI, netns and agent directories bind-mounted from its state dir) and its
// own cgroup namespace rooted at its own subtree of every hierarchy, so a
// node agent attaching "at the cgroup root" sees only its node's pods. All
// nodes share the host's kernel, as kind nodes do: that is the point of
// running several on one host.
//
// A holder process (sleep, started inside the namespaces) keeps them alive
// and is the target every node process enters with nsenter after moving
// itself into the node's cgroups, so the kubelet, containerd, kube-proxy and
// commands run by Exec all live in the node.

const (
	// APIServerIP is the host's address on the node network: the API
	// server binds it, and every node routes to it.
	APIServerIP = "10.243.0.1"
	// NodeNetworkPrefix is the node network (a /24 on the host bridge);
	// node i has address .2+i.
	NodeNetworkPrefix = "10.243.0."
	// ClusterPodCIDR holds every node's pod CIDR; node i has 10.244.i.0/24.
	ClusterPodCIDR = "10.244.0.0/16"
	// PodBridge is each node's pod bridge, inside the node's netns.
	PodBridge = "kebpf-pods"
	// MaxNodes bounds NODES: one /24 of pods per node under ClusterPodCIDR,
	// and more would not fit this host's memory anyway.
	MaxNodes = 8

	nodeMark = "node.json"
)

// node is one node's fixed plan: names and addresses follow from its index.
type node struct {
	Index int    `json:"index"`
	Name  string `json:"name"`
}

func planNodes(n int) []node {
	out := make([]node, n)
	for i := range out {
		out[i] = node{Index: i, Name: nodeName(i)}
	}
	return out
}

// nodeName is NodeName for the first node, then kebpf-node2, kebpf-node3...
func nodeName(i int) string {
	if i == 0 {
		return NodeName
	}
	return NodeName + strconv.Itoa(i+1)
}

// IP is the node's InternalIP on the node network.
func (n node) IP() string { return NodeNetworkPrefix + strconv.Itoa(2+n.Index) }

// PodCIDR is the node's pod subnet.
func (n node) PodCIDR() string { return fmt.Sprintf("10.244.%d.0/24", n.Index) }

// PodGateway is the node's pod bridge address.
func (n node) PodGateway() string { return fmt.Sprintf("10.244.%d.1", n.Index) }

// netns is the named network namespace on the host (/run/netns/<name>).
func (n node) netns() string { return n.Name }

// hostVeth is the host end of the node's link to the node network.
func (n node) hostVeth() string { return fmt.Sprintf("kebpfn%d", n.Index) }

// cgroupName is the node's directory in every cgroup hierarchy.
func (n node) cgroupName() string { return n.Name }

// nodeDir is the node's state: everything bind-mounted into it, its
// containerd, its pid files and logs.
func (s *state) nodeDir(n node, elem ...string) string {
	return filepath.Join(append([]string{s.dir, "nodes", n.Name}, elem...)...)
}

// nodeSock is the node's containerd socket, outside the node's bind mounts
// so the host (ctr, LoadImages) reaches it too; short for sun_path.
func (s *state) nodeSock(n node) string {
	return filepath.Join(s.runDir, n.Name+".sock")
}

func (s *state) nodeRuncRoot(n node) string { return filepath.Join(s.runDir, n.Name+"-runc") }

// nodes lists the nodes this cluster's state holds, in index order.
func (s *state) nodes() []node {
	ents, _ := os.ReadDir(s.path("nodes"))
	var out []node
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.path("nodes"), e.Name(), nodeMark))
		if err != nil {
			continue
		}
		var n node
		if _, err := fmt.Sscanf(string(b), "%d %s", &n.Index, &n.Name); err == nil && n.Name == e.Name() {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

func (s *state) node(name string) (node, error) {
	nodes := s.nodes()
	if len(nodes) == 0 {
		return node{}, fmt.Errorf("cluster %q has no nodes", s.name)
	}
	if name == "" {
		return nodes[0], nil
	}
	var names []string
	for _, n := range nodes {
		if n.Name == name {
			return n, nil
		}
		names = append(names, n.Name)
	}
	return node{}, fmt.Errorf("cluster %q has no node %q (nodes: %s)", s.name, name, strings.Join(names, ", "))
}

// nodeBinds are the node's own directories, bind-mounted over the host
// paths the kubelet, containerd, the CNI plugins and our agent's hostPath
// volumes use, so each node sees only its own.
var nodeBinds = []struct{ dst, src string }{
	{"/var/lib/kubelet", "kubelet"},
	{"/etc/cni/net.d", "cni/net.d"},
	{"/opt/cni/bin", "cni/bin"},
	{"/var/lib/cni", "cni/lib"},
	{"/run/netns", "netns"},
	{"/run/kubectl-ebpf", "run-kubectl-ebpf"},
	{"/var/log/pods", "pod-logs"},
	{"/var/log/containers", "container-logs"},
}

// hierarchy is one cgroup filesystem mounted under /sys/fs/cgroup.
type hierarchy struct {
	dir  string // mount point on the host
	fs   string // cgroup or cgroup2
	opts string // mount options selecting the controllers (v1)
}

// cgroupHierarchies lists the host's cgroup mounts under /sys/fs/cgroup:
// a hybrid host has one per v1 controller set plus the unified one, a
// unified host only /sys/fs/cgroup itself.
func cgroupHierarchies() ([]hierarchy, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []hierarchy
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 {
			continue
		}
		mp := unescapeMount(pf[4])
		if mp != "/sys/fs/cgroup" && !strings.HasPrefix(mp, "/sys/fs/cgroup/") {
			continue
		}
		switch qf[0] {
		case "cgroup2":
			out = append(out, hierarchy{dir: mp, fs: "cgroup2"})
		case "cgroup":
			var sel []string
			for _, o := range strings.Split(qf[2], ",") {
				switch {
				case o == "rw" || o == "ro" || o == "xattr" || o == "noprefix" || strings.HasPrefix(o, "release_agent") || o == "clone_children":
				default:
					sel = append(sel, o)
				}
			}
			if len(sel) == 1 && strings.HasPrefix(sel[0], "name=") {
				sel = append([]string{"none"}, sel...)
			}
			out = append(out, hierarchy{dir: mp, fs: "cgroup", opts: strings.Join(sel, ",")})
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("no cgroup filesystem mounted under /sys/fs/cgroup")
	}
	return out, nil
}

// nodeCgroups are the node's cgroup directories, one per hierarchy.
func nodeCgroups(n node) ([]string, error) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, h := range hs {
		out = append(out, filepath.Join(h.dir, n.cgroupName()))
	}
	return out, nil
}

// createCgroups makes the node's cgroup in every hierarchy; a v1 cpuset
// takes no task before it has CPUs and memory nodes, copied from the root.
func createCgroups(n node) ([]string, error) {
	dirs, err := nodeCgroups(n)
	if err != nil {
		return nil, err
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			p := filepath.Join(d, f)
			if _, err := os.Stat(p); err != nil || filepath.Base(filepath.Dir(d)) != "cpuset" {
				continue
			}
			cur, _ := os.ReadFile(p)
			if strings.TrimSpace(string(cur)) != "" {
				continue
			}
			root, err := os.ReadFile(filepath.Join(filepath.Dir(d), f))
			if err != nil {
				return nil, err
			}
			if err := os.WriteFile(p, root, 0o644); err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
		}
	}
	return dirs, nil
}

// setupScript runs inside the node's fresh mount and cgroup namespaces and
// then becomes the holder. Mounts are slaves of the host's (nothing the
// node mounts leaks out), then shared inside the node: the kubelet accepts
// Bidirectional propagation (our agent's init container) only on shared
// mounts, as on every real node.
func (s *state) setupScript(n node) (string, error) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("set -e\n")
	// A sysfs of the node's netns (/sys/class/net shows its links), with
	// the cgroup mounts of the node's cgroup namespace on it.
	b.WriteString("mount -t sysfs sysfs /sys\n")
	unified := len(hs) == 1 && hs[0].dir == "/sys/fs/cgroup" && hs[0].fs == "cgroup2"
	if unified {
		b.WriteString("mount -t cgroup2 cgroup2 /sys/fs/cgroup\n")
	} else {
		b.WriteString("mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n")
		for _, h := range hs {
			if h.dir == "/sys/fs/cgroup" {
				continue
			}
			fmt.Fprintf(&b, "mkdir -p %s\n", h.dir)
			if h.fs == "cgroup2" {
				fmt.Fprintf(&b, "mount -t cgroup2 cgroup2 %s\n", h.dir)
			} else {
				fmt.Fprintf(&b, "mount -t cgroup -o %s cgroup %s\n", h.opts, h.dir)
			}
		}
		// Co-mounted controllers have alias links (cpu -> cpu,cpuacct).
		ents, _ := os.ReadDir("/sys/fs/cgroup")
		for _, e := range ents {
			if e.Type()&os.ModeSymlink == 0 {
				continue
			}
			if t, err := os.Readlink(filepath.Join("/sys/fs/cgroup", e.Name())); err == nil {
				fmt.Fprintf(&b, "ln -s %s /sys/fs/cgroup/%s\n", t, e.Name())
			}
		}
	}
	// The node's own bpffs instance: pins of one node's agent are not the
	// other's.
	b.WriteString("mount -t bpf bpf /sys/fs/bpf\n")
	for _, bd := range nodeBinds {
		fmt.Fprintf(&b, "mount --bind %s %s\n", s.nodeDir(n, bd.src), bd.dst)
	}
	b.WriteString("mount --make-rshared /\n")
	fmt.Fprintf(&b, "touch %s\n", s.nodeDir(n, "ready"))
	b.WriteString("exec /usr/bin/sleep infinity\n")
	return b.String(), nil
}

// enterScript moves the shell into the node's cgroups, then enters the
// holder's namespaces and runs "$@": the same steps `docker exec` takes.
const enterScript = `for d in $KEBPF_NODE_CGROUPS; do echo $$ > "$d/cgroup.procs" || exit 125; done
exec /usr/bin/nsenter --target "$KEBPF_NODE_HOLDER" --net --mount --cgroup -- "$@"`

// holderScript is enterScript for the holder itself: its namespaces are new.
const holderScript = `for d in $KEBPF_NODE_CGROUPS; do echo $$ > "$d/cgroup.procs" || exit 125; done
exec /usr/bin/nsenter --net="$KEBPF_NODE_NETNS" -- /usr/bin/unshare --mount --cgroup --propagation slave -- /bin/sh -c "$KEBPF_NODE_SETUP"`

func holderComponent(n node) string { return n.Name + "/holder" }

// nodeEnv is what enterScript needs to run a command in node n.
func (s *state) nodeEnv(n node) ([]string, error) {
	pid := s.alive(holderComponent(n))
	if pid == 0 {
		return nil, fmt.Errorf("node %s is not running (no holder process)", n.Name)
	}
	dirs, err := nodeCgroups(n)
	if err != nil {
		return nil, err
	}
	return []string{"KEBPF_NODE_CGROUPS=" + strings.Join(dirs, " "), "KEBPF_NODE_HOLDER=" + strconv.Itoa(pid)}, nil
}

// inNode wraps argv to run inside node n.
func inNode(argv []string) []string {
	return append([]string{"/bin/sh", "-c", enterScript, "kebpf-node-exec"}, argv...)
}

// startNode creates node n's namespaces, network and directories and starts
// its holder; idempotent, so a second Create completes a partial one.
func (s *state) startNode(ctx context.Context, n node) error {
	for _, bd := range nodeBinds {
		if err := os.MkdirAll(s.nodeDir(n, bd.src), 0o755); err != nil {
			return err
		}
		if err := os.MkdirAll(bd.dst, 0o755); err != nil {
			return fmt.Errorf("create mount point %s: %w", bd.dst, err)
		}
	}
	if err := writeFile(s.nodeDir(n, nodeMark), fmt.Sprintf("%d %s\n", n.Index, n.Name)); err != nil {
		return err
	}
	if err := s.nodeNetwork(ctx, n); err != nil {
		return fmt.Errorf("node %s network: %w", n.Name, err)
	}
	dirs, err := createCgroups(n)
	if err != nil {
		return err
	}
	if s.alive(holderComponent(n)) > 0 {
		return nil
	}
	os.Remove(s.nodeDir(n, "ready"))
	script, err := s.setupScript(n)
	if err != nil {
		return err
	}
	if _, err := s.start(component{
		name:   holderComponent(n),
		bin:    "/usr/bin/sleep",
		launch: []string{"/bin/sh", "-c", holderScript},
		env: []string{
			"KEBPF_NODE_CGROUPS=" + strings.Join(dirs, " "),
			"KEBPF_NODE_NETNS=/run/netns/" + n.netns(),
			"KEBPF_NODE_SETUP=" + script,
		},
	}); err != nil {
		return err
	}
	return s.waitFor(ctx, holderComponent(n), 20*time.Second, func() error {
		if _, err := os.Stat(s.nodeDir(n, "ready")); err != nil {
			return fmt.Errorf("node %s mounts not ready", n.Name)
		}
		return nil
	})
}

// nodeNetwork puts node n on the node network: a veth from the host bridge
// into its netns, its address, routes to the other nodes' pod CIDRs (added
// by routeNodes) and to the API server, forwarding on inside the node.
func (s *state) nodeNetwork(ctx context.Context, n node) error {
	if _, err := os.Stat("/run/netns/" + n.netns()); err != nil {
		if _, err := run(ctx, "ip", "netns", "add", n.netns()); err != nil {
			return err
		}
	}
	if !linkExists(n.hostVeth()) {
		if _, err := run(ctx, "ip", "link", "add", n.hostVeth(), "type", "veth", "peer", "name", "eth0", "netns", n.netns()); err != nil {
			return err
		}
	}
	ns := func(args ...string) error {
		_, err := run(ctx, "ip", append([]string{"-n", n.netns()}, args...)...)
		return err
	}
	for _, step := range [][]string{
		{"link", "set", n.hostVeth(), "master", Bridge},
		{"link", "set", n.hostVeth(), "up"},
		{"route", "replace", n.PodCIDR(), "via", n.IP()},
	} {
		if _, err := run(ctx, "ip", step...); err != nil {
			return err
		}
	}
	for _, step := range [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "replace", n.IP() + "/24", "dev", "eth0"},
		{"link", "set", "eth0", "up"},
		// Everything not on a node goes to the host, where the containment
		// rules drop what would leave the machine.
		{"route", "replace", "default", "via", APIServerIP},
	} {
		if err := ns(step...); err != nil {
			return err
		}
	}
	for k, v := range map[string]string{
		"net.ipv4.ip_forward":                "1",
		"net.bridge.bridge-nf-call-iptables": "1",
	} {
		if _, err := run(ctx, "ip", "netns", "exec", n.netns(), "sh", "-c", fmt.Sprintf("echo %s > %s", v, sysctlPath(k))); err != nil {
			return err
		}
	}
	return nil
}

// routeNodes gives every node a route to every other node's pod CIDR.
func routeNodes(ctx context.Context, nodes []node) error {
	for _, a := range nodes {
		for _, b := range nodes {
			if a == b {
				continue
			}
			if _, err := run(ctx, "ip", "-n", a.netns(), "route", "replace", b.PodCIDR(), "via", b.IP()); err != nil {
				return err
			}
		}
	}
	return nil
}

// nodeNames are the Kubernetes names of nodes.
func nodeNames(nodes []node) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.Name)
	}
	return out
}

func hasNode(nodes []node, name string) bool {
	return slices.ContainsFunc(nodes, func(n node) bool { return n.Name == name })
}
