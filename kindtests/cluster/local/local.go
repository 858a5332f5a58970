// Package local is the Docker-free cluster provider: real Kubernetes nodes
// on this host, each in its own network, mount and cgroup namespaces with its
// own kubelet, containerd, bridge CNI and optionally kube-proxy (node.go),
// and one control plane (etcd, API server, controller manager, scheduler)
// in the host's namespaces, for machines where kind cannot run privileged
// containers.
package local

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/images"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

const (
	// NodeName is the first node's name (kebpf-node2... follow).
	NodeName = "kebpf-node"
	// ServiceCIDR is the cluster's service range.
	ServiceCIDR = "10.96.0.0/16"
	// APIPort is the API server's port on APIServerIP.
	APIPort = 6443
	// Bridge is the node network's bridge on the host.
	Bridge = "kebpf0"
	// PauseImage is the sandbox image, built locally and never pulled.
	PauseImage = "registry.k8s.io/pause:3.10"

	etcdClientURL = "http://127.0.0.1:12379"
	etcdPeerURL   = "http://127.0.0.1:12380"
	ctrNamespace  = "k8s.io"
)

//go:embed pause/main.go
var pauseSource []byte

// Provider is the "local" cluster provider.
type Provider struct{}

var _ cluster.Provider = (*Provider)(nil)

// New returns the local provider.
func New() *Provider { return &Provider{} }

// Name implements cluster.Provider.
func (*Provider) Name() string { return "local" }

// StateDir is where a cluster keeps all its files: $KEBPF_CLUSTER_STATE, else
// /var/lib/kubectl-ebpf-cluster/<name>.
func StateDir(name string) string {
	if d := os.Getenv("KEBPF_CLUSTER_STATE"); d != "" {
		return d
	}
	return filepath.Join("/var/lib/kubectl-ebpf-cluster", name)
}

type state struct {
	name   string
	dir    string
	runDir string // containerd sockets and runc state, keyed by name
}

func newState(name string) *state {
	if name == "" {
		name = cluster.DefaultName
	}
	run := filepath.Join("/run/kebpf-containerd", name)
	return &state{name: name, dir: StateDir(name), runDir: run}
}

func (s *state) path(elem ...string) string {
	return filepath.Join(append([]string{s.dir}, elem...)...)
}

func (s *state) kubeconfig() string { return s.path("kubeconfig") }

func (s *state) cluster() *cluster.Cluster {
	return &cluster.Cluster{Name: s.name, Provider: "local", Kubeconfig: s.kubeconfig(), Nodes: nodeNames(s.nodes())}
}

// hostTools maps each host command we run to the Debian package providing it.
var hostTools = []struct{ path, pkg string }{
	{"/usr/bin/etcd", "etcd-server"},
	{"/usr/bin/containerd", "containerd"},
	{"/usr/bin/containerd-shim-runc-v2", "containerd"},
	{"/usr/bin/ctr", "containerd"},
	{"runc", "runc"},
	{"/usr/lib/cni/bridge", "containernetworking-plugins"},
	{"/usr/lib/cni/host-local", "containernetworking-plugins"},
	{"/usr/lib/cni/loopback", "containernetworking-plugins"},
	{"/usr/lib/cni/portmap", "containernetworking-plugins"},
	{"iptables", "iptables"},
	{"ip", "iproute2"},
	{"mount", "mount"},
	{"/usr/bin/nsenter", "util-linux"},
	{"/usr/bin/unshare", "util-linux"},
}

// Available implements cluster.Provider.
func (*Provider) Available(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("local cluster needs root (it runs a kubelet, containerd and changes iptables)")
	}
	var missing []string
	for _, t := range hostTools {
		if strings.HasPrefix(t.path, "/") {
			if _, err := os.Stat(t.path); err != nil {
				missing = append(missing, fmt.Sprintf("%s (apt-get install %s)", t.path, t.pkg))
			}
		} else if _, err := exec.LookPath(t.path); err != nil {
			missing = append(missing, fmt.Sprintf("%s (apt-get install %s)", t.path, t.pkg))
		}
	}
	if !k8sbin.CoreDNSCached() {
		if _, err := exec.LookPath("go"); err != nil {
			missing = append(missing, "go toolchain (to build CoreDNS)")
		} else if _, err := k8sbin.CoreDNSSourceDir(); err != nil {
			missing = append(missing, err.Error())
		}
	}
	if !k8sbin.Cached() {
		if _, err := exec.LookPath("go"); err != nil {
			missing = append(missing, "go toolchain (to build the Kubernetes binaries)")
		} else if _, err := k8sbin.SourceDir(); err != nil {
			missing = append(missing, err.Error())
		}
	}
	if _, err := exec.LookPath("go"); err != nil {
		if _, err := os.Stat(pauseTarball()); err != nil {
			missing = append(missing, "go toolchain (to build the pause image)")
		}
	}
	if _, err := os.Stat("/proc/sys/net/bridge"); err != nil {
		missing = append(missing, "br_netfilter (modprobe br_netfilter)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("local cluster: missing %s", strings.Join(missing, ", "))
	}
	return nil
}

type stepper struct {
	log   io.Writer
	start time.Time
	last  time.Time
}

func (st *stepper) done(format string, args ...any) {
	now := time.Now()
	fmt.Fprintf(st.log, "local: %-45s (%5.1fs, total %5.1fs)\n", fmt.Sprintf(format, args...), now.Sub(st.last).Seconds(), now.Sub(st.start).Seconds())
	st.last = now
}

// Create implements cluster.Provider.
func (p *Provider) Create(ctx context.Context, opts cluster.Options) (*cluster.Cluster, error) {
	log := opts.Log
	if log == nil {
		log = io.Discard
	}
	s := newState(opts.Name)
	st := &stepper{log: log, start: time.Now(), last: time.Now()}
	if err := p.Available(ctx); err != nil {
		return nil, err
	}
	count := opts.Nodes
	if count == 0 {
		count = 1
	}
	if count < 1 || count > MaxNodes {
		return nil, fmt.Errorf("local cluster: %d nodes asked, 1 to %d fit", opts.Nodes, MaxNodes)
	}
	nodes := planNodes(count)
	// Bridge, addresses and ports are fixed: one local cluster per host.
	if other := otherCluster(s); other != "" {
		return nil, fmt.Errorf("local cluster %q exists (state in %s); delete it first, only one local cluster fits on a host", other, filepath.Dir(s.dir))
	}
	if have := s.nodes(); len(have) > 0 && len(have) != count {
		return nil, fmt.Errorf("local cluster %q has %d node(s), %d asked: delete it first (make cluster-down)", s.name, len(have), count)
	}
	if s.healthy(ctx, nodes, opts.KubeProxy) {
		// A cluster an older version made may lack the DNS: converge
		// (seconds when it is there already).
		if err := s.reuseDNS(ctx, log); err != nil {
			return nil, err
		}
		st.done("reusing running cluster %q (%d nodes)", s.name, count)
		return s.cluster(), nil
	}
	binDir, err := k8sbin.Ensure(ctx, log)
	if err != nil {
		return nil, err
	}
	st.done("kubernetes %s binaries ready", k8sbin.Version)
	corednsBin, err := k8sbin.EnsureCoreDNS(ctx, log)
	if err != nil {
		return nil, err
	}
	st.done("coredns %s binary ready", k8sbin.CoreDNSVersion)
	for _, d := range []string{s.dir, s.runDir, s.path("logs"), s.path("run"), s.path("etcd"), s.path("apiserver")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	// Record before anything can change them, and never overwrite: a second
	// Create after a partial one must keep the host's original values.
	if err := s.recordHost(); err != nil {
		return nil, err
	}
	users := append([]certSpec(nil), clientUsers...)
	for _, n := range nodes {
		users = append(users, kubeletUser(n))
	}
	if err := ensurePKI(s.path("pki"), users); err != nil {
		return nil, err
	}
	for _, u := range users {
		path := s.path(u.file + ".kubeconfig")
		if u.file == "admin" {
			path = s.kubeconfig()
		}
		if err := writeKubeconfig(s.path("pki"), path, u.file); err != nil {
			return nil, err
		}
	}
	if err := s.setupNetwork(ctx); err != nil {
		return nil, err
	}
	st.done("node network %s %s/24, containment rules", Bridge, APIServerIP)
	for _, n := range nodes {
		if err := s.writeNodeConfig(n); err != nil {
			return nil, err
		}
		if err := s.startNode(ctx, n); err != nil {
			return nil, err
		}
	}
	if err := routeNodes(ctx, nodes); err != nil {
		return nil, err
	}
	st.done("%d node(s): netns, mount ns, cgroup ns, pod CIDRs routed", len(nodes))

	if _, err := s.start(component{name: "etcd", bin: "/usr/bin/etcd", args: []string{
		"--name", "kebpf", "--data-dir", s.path("etcd"),
		"--listen-client-urls", etcdClientURL, "--advertise-client-urls", etcdClientURL,
		"--listen-peer-urls", etcdPeerURL, "--initial-advertise-peer-urls", etcdPeerURL,
		"--initial-cluster", "kebpf=" + etcdPeerURL, "--initial-cluster-state", "new",
		"--listen-metrics-urls", "",
	}}); err != nil {
		return nil, err
	}
	for i := range nodes {
		if _, err := s.start(s.containerd(&nodes[i])); err != nil {
			return nil, err
		}
	}
	if err := s.waitFor(ctx, "etcd", 60*time.Second, func() error {
		resp, err := http.Get(etcdClientURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("etcd health %s", resp.Status)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	st.done("etcd healthy")

	if _, err := s.start(s.apiServer(binDir)); err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if err := s.waitFor(ctx, containerdComponent(n), 60*time.Second, func() error {
			return s.ctr(ctx, n, "version")
		}); err != nil {
			return nil, err
		}
		if err := s.ensurePause(ctx, n); err != nil {
			return nil, err
		}
		if err := s.ensureCoreDNSImage(ctx, n, corednsBin); err != nil {
			return nil, err
		}
	}
	st.done("containerd up on every node, pause and coredns images imported")

	apiURL, err := s.waitAPIServer(ctx)
	if err != nil {
		return nil, err
	}
	st.done("kube-apiserver ready (%s)", apiURL)

	// The controller manager exits on a forbidden configmap read when started
	// before /readyz passes, so it comes only now.
	comps := []component{
		{name: "kube-controller-manager", bin: filepath.Join(binDir, "kube-controller-manager"), args: s.controllerArgs("controller-manager.kubeconfig",
			"--service-account-private-key-file", s.path("pki", "sa.key"),
			"--root-ca-file", s.path("pki", "ca.crt"),
			"--cluster-signing-cert-file", s.path("pki", "ca.crt"),
			"--cluster-signing-key-file", s.path("pki", "ca.key"),
			"--use-service-account-credentials=true",
			"--service-cluster-ip-range", ServiceCIDR,
			"--controllers", "*,bootstrapsigner,tokencleaner",
		)},
		{name: "kube-scheduler", bin: filepath.Join(binDir, "kube-scheduler"), args: s.controllerArgs("scheduler.kubeconfig")},
	}
	waitNames := []string{"kube-controller-manager", "kube-scheduler"}
	for i := range nodes {
		n := &nodes[i]
		comps = append(comps, s.kubelet(binDir, n))
		waitNames = append(waitNames, kubeletComponent(*n))
		if opts.KubeProxy {
			comps = append(comps, s.kubeProxy(binDir, n))
			waitNames = append(waitNames, kubeProxyComponent(*n))
		}
	}
	if opts.KubeProxy {
		if err := os.WriteFile(s.path("kube-proxy.enabled"), nil, 0o644); err != nil {
			return nil, fmt.Errorf("record kube-proxy: %w", err)
		}
	}
	for _, c := range comps {
		if _, err := s.start(c); err != nil {
			return nil, err
		}
	}
	st.done("controller-manager, scheduler, kubelet%s started", map[bool]string{true: ", kube-proxy"}[opts.KubeProxy])

	cs, err := s.clientset()
	if err != nil {
		return nil, err
	}
	if err := s.waitFor(ctx, "nodes Ready", 180*time.Second, func() error {
		for _, n := range waitNames {
			if err := s.checkExited(n); err != nil {
				return backoffStop{err}
			}
		}
		for _, n := range nodes {
			if err := nodeReady(ctx, cs, n.Name); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	st.done("nodes %s Ready", strings.Join(nodeNames(nodes), ", "))
	if err := s.waitFor(ctx, "default ServiceAccount", 120*time.Second, func() error {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return nil, err
	}
	st.done("default ServiceAccount exists")
	if err := s.ensureDNS(ctx, cs); err != nil {
		return nil, err
	}
	st.done("CoreDNS Ready (kube-dns %s); cluster ready, kubeconfig %s", DNSServiceIP, s.kubeconfig())
	return s.cluster(), nil
}

// writeNodeConfig writes node n's containerd, kubelet, kube-proxy and CNI
// configuration and links the CNI plugins into its own bin dir.
func (s *state) writeNodeConfig(n node) error {
	for path, content := range map[string]string{
		s.nodeDir(n, "containerd", "config.toml"): s.containerdConfig(n),
		s.nodeDir(n, "kubelet-config.yaml"):       s.kubeletConfig(n),
		s.nodeDir(n, "kube-proxy-config.yaml"):    s.kubeProxyConfig(n),
		s.nodeDir(n, "cni", "net.d", cniConfName): s.cniConfig(n),
	} {
		if err := writeFile(path, content); err != nil {
			return err
		}
	}
	return linkCNIPlugins(s.nodeDir(n, "cni", "bin"))
}

func containerdComponent(n node) string { return n.Name + "/containerd" }
func kubeletComponent(n node) string    { return n.Name + "/kubelet" }
func kubeProxyComponent(n node) string  { return n.Name + "/kube-proxy" }

func (s *state) containerd(n *node) component {
	return component{name: containerdComponent(*n), node: n, bin: "/usr/bin/containerd",
		args: []string{"--config", s.nodeDir(*n, "containerd", "config.toml")}}
}

func (s *state) kubelet(binDir string, n *node) component {
	return component{name: kubeletComponent(*n), node: n, bin: filepath.Join(binDir, "kubelet"), args: []string{
		"--config", s.nodeDir(*n, "kubelet-config.yaml"),
		"--kubeconfig", s.path(kubeletUser(*n).file + ".kubeconfig"),
		"--root-dir", "/var/lib/kubelet",
		"--cert-dir", "/var/lib/kubelet/pki",
		"--volume-plugin-dir", "/var/lib/kubelet/volume-plugins",
		"--node-ip", n.IP(),
		"--hostname-override", n.Name,
	}}
}

func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

// backoffStop makes waitFor give up at once.
type backoffStop struct{ err error }

func (b backoffStop) Error() string { return b.err.Error() }

// waitFor polls check until it passes, the component named what dies, ctx
// ends or timeout passes.
func (s *state) waitFor(ctx context.Context, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if err := s.checkExited(what); err != nil {
			return err
		}
		last = check()
		if last == nil {
			return nil
		}
		var stop backoffStop
		if errors.As(last, &stop) {
			return stop.err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for %s (%s): %w; logs in %s", what, timeout, last, s.path("logs"))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func nodeReady(ctx context.Context, cs kubernetes.Interface, name string) error {
	n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("node %s not registered yet", name)
		}
		return err
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status == corev1.ConditionTrue {
				return nil
			}
			return fmt.Errorf("node %s not ready: %s", name, c.Message)
		}
	}
	return errors.New("node has no Ready condition")
}

func (s *state) clientset() (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", s.kubeconfig())
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.Timeout = 10 * time.Second
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	return cs, nil
}

func (s *state) adminHTTP() (*http.Client, error) {
	caPEM, err := os.ReadFile(s.path("pki", "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(s.path("pki", "admin.crt"), s.path("pki", "admin.key"))
	if err != nil {
		return nil, fmt.Errorf("load admin cert: %w", err)
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}, nil
}

// healthy reports whether a complete cluster of this name and these nodes
// already runs.
func (s *state) healthy(ctx context.Context, nodes []node, kubeProxy bool) bool {
	names := []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
	for _, n := range nodes {
		names = append(names, holderComponent(n), containerdComponent(n), kubeletComponent(n))
		if kubeProxy {
			names = append(names, kubeProxyComponent(n))
		}
	}
	for _, n := range names {
		if s.alive(n) == 0 {
			return false
		}
	}
	httpc, err := s.adminHTTP()
	if err != nil {
		return false
	}
	resp, err := httpc.Get(fmt.Sprintf("https://%s:%d/readyz", APIServerIP, APIPort))
	if err != nil {
		return false
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return false
	}
	cs, err := s.clientset()
	if err != nil {
		return false
	}
	for _, n := range nodes {
		if nodeReady(ctx, cs, n.Name) != nil {
			return false
		}
	}
	return true
}

// ctr runs ctr against node n's containerd in the k8s.io namespace.
func (s *state) ctr(ctx context.Context, n node, args ...string) error {
	_, err := s.ctrOut(ctx, n, args...)
	return err
}

func (s *state) ctrOut(ctx context.Context, n node, args ...string) ([]byte, error) {
	full := append([]string{"--address", s.nodeSock(n), "--namespace", ctrNamespace}, args...)
	out, err := exec.CommandContext(ctx, "/usr/bin/ctr", full...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

func pauseTarball() string {
	return filepath.Join(cluster.CacheDir(), "images", "pause-3.10.tar")
}

// ensurePause builds (once, cached) and imports the sandbox image: the kubelet
// must find it before the first pod, as nothing can be pulled here.
func (s *state) ensurePause(ctx context.Context, n node) error {
	out, err := s.ctrOut(ctx, n, "images", "ls", "-q")
	if err == nil && containsLine(string(out), PauseImage) {
		return nil
	}
	tarPath := pauseTarball()
	if _, err := os.Stat(tarPath); err != nil {
		if err := buildPause(ctx, tarPath); err != nil {
			return err
		}
	}
	return s.importImage(ctx, n, tarPath)
}

func containsLine(out, want string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.TrimSpace(l) == want {
			return true
		}
	}
	return false
}

func buildPause(ctx context.Context, tarPath string) error {
	tmp, err := os.MkdirTemp("", "kebpf-pause-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	// A throwaway module: the pause binary has no dependencies and must build
	// wherever the repository (or only this package's binary) is.
	if err := os.WriteFile(filepath.Join(tmp, "go.mod"), []byte("module kebpfpause\n\ngo 1.22\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "main.go"), pauseSource, 0o644); err != nil {
		return err
	}
	bin := filepath.Join(tmp, "pause")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %w: %s", err, bytes.TrimSpace(out))
	}
	if err := os.MkdirAll(filepath.Dir(tarPath), 0o755); err != nil {
		return err
	}
	return images.BuildBinaryImage(ctx, PauseImage, map[string]string{"/pause": bin}, []string{"/pause"}, tarPath)
}

func (s *state) importImage(ctx context.Context, n node, tarball string) error {
	return s.ctr(ctx, n, "images", "import", tarball)
}

// LoadImages implements cluster.Provider: every node's containerd gets them.
func (*Provider) LoadImages(ctx context.Context, name string, tarballs []string) error {
	s := newState(name)
	nodes := s.nodes()
	if len(nodes) == 0 {
		return fmt.Errorf("load images: cluster %q has no nodes", s.name)
	}
	for _, n := range nodes {
		if s.alive(containerdComponent(n)) == 0 {
			return fmt.Errorf("load images: containerd of node %s is not running", n.Name)
		}
		for _, t := range tarballs {
			if err := s.importImage(ctx, n, t); err != nil {
				return fmt.Errorf("load image %s into %s: %w", t, n.Name, err)
			}
		}
	}
	return nil
}

// Exec implements cluster.Provider: argv runs inside the node's
// namespaces and cgroups, as `docker exec` into a kind node does.
func (*Provider) Exec(ctx context.Context, name, nodeName string, argv ...string) ([]byte, error) {
	if len(argv) == 0 {
		return nil, errors.New("exec: empty command")
	}
	s := newState(name)
	n, err := s.node(nodeName)
	if err != nil {
		return nil, err
	}
	env, err := s.nodeEnv(n)
	if err != nil {
		return nil, err
	}
	full := inNode(argv)
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("exec %s on %s: %w", argv[0], n.Name, err)
	}
	return out, nil
}

// controllerArgs are the flags kube-controller-manager and kube-scheduler
// share, then extra: one kubeconfig for the API and for delegated
// authentication and authorization, the secure port on loopback, and no
// leader election (one node, one instance).
func (s *state) controllerArgs(kubeconfig string, extra ...string) []string {
	kc := s.path(kubeconfig)
	return append([]string{
		"--kubeconfig", kc, "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
		"--bind-address", "127.0.0.1", "--leader-elect=false",
	}, extra...)
}

// apiServer is the kube-apiserver component, on the node network's bridge
// address.
func (s *state) apiServer(binDir string) component {
	return component{name: "kube-apiserver", bin: filepath.Join(binDir, "kube-apiserver"), args: []string{
		"--advertise-address", APIServerIP, "--bind-address", APIServerIP, "--secure-port", fmt.Sprint(APIPort),
		"--etcd-servers", etcdClientURL,
		"--service-cluster-ip-range", ServiceCIDR,
		"--cert-dir", s.path("apiserver"),
		"--client-ca-file", s.path("pki", "ca.crt"),
		"--tls-cert-file", s.path("pki", "apiserver.crt"), "--tls-private-key-file", s.path("pki", "apiserver.key"),
		"--kubelet-client-certificate", s.path("pki", "apiserver-kubelet-client.crt"),
		"--kubelet-client-key", s.path("pki", "apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types", "InternalIP",
		"--service-account-key-file", s.path("pki", "sa.pub"),
		"--service-account-signing-key-file", s.path("pki", "sa.key"),
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--authorization-mode", "Node,RBAC",
		"--enable-admission-plugins", "NodeRestriction",
		"--allow-privileged=true",
		"--profiling=false",
	}}
}

// waitAPIServer waits for the API server's /readyz and returns its URL.
func (s *state) waitAPIServer(ctx context.Context) (string, error) {
	httpc, err := s.adminHTTP()
	if err != nil {
		return "", err
	}
	apiURL := fmt.Sprintf("https://%s:%d", APIServerIP, APIPort)
	if err := s.waitFor(ctx, "kube-apiserver", 120*time.Second, func() error {
		resp, err := httpc.Get(apiURL + "/readyz")
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("readyz %s: %s", resp.Status, lastLine(b))
		}
		return nil
	}); err != nil {
		return "", err
	}
	return apiURL, nil
}
