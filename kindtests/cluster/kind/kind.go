// Package kind is the cluster provider for machines with a container engine
// that can run privileged containers (Docker or Podman on a laptop, most CI
// runners): it creates clusters with the sigs.k8s.io/kind Go library.
package kind

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	kindcluster "sigs.k8s.io/kind/pkg/cluster"
	"sigs.k8s.io/kind/pkg/cluster/nodeutils"
	kindlog "sigs.k8s.io/kind/pkg/log"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
)

// Provider creates kind clusters.
type Provider struct{}

var _ cluster.Provider = (*Provider)(nil)

// New returns the kind provider.
func New() *Provider { return &Provider{} }

// Name implements cluster.Provider.
func (*Provider) Name() string { return "kind" }

// engine returns the container engine binary kind would use.
func engine() (string, error) {
	if e := os.Getenv("KIND_EXPERIMENTAL_PROVIDER"); e != "" {
		return e, nil
	}
	for _, e := range []string{"docker", "podman"} {
		if _, err := exec.LookPath(e); err == nil {
			return e, nil
		}
	}
	return "", errors.New("no container engine (docker or podman) on PATH")
}

// Available implements cluster.Provider. A reachable engine is not enough:
// kind nodes are privileged containers, and a rootful engine on a host whose
// capability bounding set is incomplete (as on our CI VMs, which withhold
// CAP_SYS_RESOURCE) cannot start them.
func (*Provider) Available(ctx context.Context) error {
	e, err := engine()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, e, "info").CombinedOutput(); err != nil {
		return fmt.Errorf("%s engine not reachable: %s", e, firstLine(out, err))
	}
	if remote := os.Getenv("DOCKER_HOST"); remote == "" || strings.HasPrefix(remote, "unix://") {
		if missing, err := missingCapabilities(); err == nil && missing != 0 {
			return fmt.Errorf("privileged containers cannot run here: this host's capability bounding set lacks %#x (kind nodes need every capability)", missing)
		}
	}
	return nil
}

// missingCapabilities returns the capability bits up to CAP_CHECKPOINT_RESTORE
// that are absent from this process's bounding set.
func missingCapabilities() (uint64, error) {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	return missingFromStatus(string(data))
}

// missingFromStatus reads the CapBnd line of a /proc/<pid>/status text.
func missingFromStatus(status string) (uint64, error) {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			var bnd uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%x", &bnd); err != nil {
				return 0, fmt.Errorf("CapBnd %q: %w", strings.TrimSpace(v), err)
			}
			const all = (uint64(1) << 41) - 1 // CAP_CHOWN .. CAP_CHECKPOINT_RESTORE (40)
			return all &^ bnd, nil
		}
	}
	return 0, errors.New("no CapBnd in /proc/self/status")
}

// firstLine picks the line of an engine's output that says what is wrong
// (`docker info` prints a "Client:" section before the daemon error).
func firstLine(out []byte, err error) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	for _, l := range lines {
		if l = strings.TrimSpace(l); strings.Contains(l, "rror") || strings.Contains(l, "annot") {
			return l
		}
	}
	if s := strings.TrimSpace(lines[len(lines)-1]); s != "" {
		return s
	}
	return err.Error()
}

// Config returns the kind cluster config: one control plane (which also runs
// pods) and nodes-1 workers (at least one), kube-proxy in iptables mode or
// absent.
func Config(kubeProxy bool, nodes int) string {
	mode := "iptables"
	if !kubeProxy {
		mode = "none"
	}
	return fmt.Sprintf(`kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  kubeProxyMode: %q
nodes:
- role: control-plane
%s`, mode, strings.Repeat("- role: worker\n", max(nodes-1, 1)))
}

func kubeconfigPath(name string) string {
	return filepath.Join(cluster.CacheDir(), "kind-"+name+".kubeconfig")
}

func newProvider(log io.Writer) *kindcluster.Provider {
	opts := []kindcluster.ProviderOption{}
	if log != nil {
		opts = append(opts, kindcluster.ProviderWithLogger(writerLogger{log}))
	}
	if o, err := kindcluster.DetectNodeProvider(); err == nil && o != nil {
		opts = append(opts, o)
	}
	return kindcluster.NewProvider(opts...)
}

// Create implements cluster.Provider.
func (p *Provider) Create(ctx context.Context, opts cluster.Options) (*cluster.Cluster, error) {
	kp := newProvider(opts.Log)
	kc := kubeconfigPath(opts.Name)
	existing, err := kp.List()
	if err != nil {
		return nil, fmt.Errorf("list kind clusters: %w", err)
	}
	exists := false
	for _, n := range existing {
		exists = exists || n == opts.Name
	}
	if !exists {
		if err := os.MkdirAll(filepath.Dir(kc), 0o755); err != nil {
			return nil, err
		}
		if err := kp.Create(opts.Name,
			kindcluster.CreateWithRawConfig([]byte(Config(opts.KubeProxy, opts.Nodes))),
			kindcluster.CreateWithWaitForReady(5*time.Minute),
			kindcluster.CreateWithKubeconfigPath(kc),
			kindcluster.CreateWithDisplayUsage(false),
			kindcluster.CreateWithDisplaySalutation(false),
		); err != nil {
			return nil, fmt.Errorf("create kind cluster %s: %w", opts.Name, err)
		}
	} else if err := kp.ExportKubeConfig(opts.Name, kc, false); err != nil {
		return nil, fmt.Errorf("export kubeconfig of %s: %w", opts.Name, err)
	}
	nodes, err := kp.ListInternalNodes(opts.Name)
	if err != nil {
		return nil, fmt.Errorf("list nodes of %s: %w", opts.Name, err)
	}
	c := &cluster.Cluster{Name: opts.Name, Provider: p.Name(), Kubeconfig: kc}
	for _, n := range nodes {
		c.Nodes = append(c.Nodes, n.String())
	}
	return c, nil
}

// Delete implements cluster.Provider.
func (p *Provider) Delete(ctx context.Context, name string, log io.Writer) error {
	if err := newProvider(log).Delete(name, kubeconfigPath(name)); err != nil {
		return fmt.Errorf("delete kind cluster %s: %w", name, err)
	}
	if err := os.Remove(kubeconfigPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// LoadImages implements cluster.Provider.
func (p *Provider) LoadImages(ctx context.Context, name string, tarballs []string) error {
	nodes, err := newProvider(nil).ListInternalNodes(name)
	if err != nil {
		return fmt.Errorf("list nodes of %s: %w", name, err)
	}
	for _, tb := range tarballs {
		for _, n := range nodes {
			f, err := os.Open(tb)
			if err != nil {
				return err
			}
			err = nodeutils.LoadImageArchive(n, f)
			f.Close()
			if err != nil {
				return fmt.Errorf("load %s into %s: %w", filepath.Base(tb), n, err)
			}
		}
	}
	return nil
}

// Exec implements cluster.Provider.
func (p *Provider) Exec(ctx context.Context, name, node string, argv ...string) ([]byte, error) {
	nodes, err := newProvider(nil).ListInternalNodes(name)
	if err != nil {
		return nil, fmt.Errorf("list nodes of %s: %w", name, err)
	}
	for _, n := range nodes {
		if n.String() != node {
			continue
		}
		var out bytes.Buffer
		err := n.CommandContext(ctx, argv[0], argv[1:]...).SetStdout(&out).SetStderr(&out).Run()
		return out.Bytes(), err
	}
	return nil, fmt.Errorf("no node %q in kind cluster %s", node, name)
}

// writerLogger adapts an io.Writer to kind's logger: Info and Warn lines are
// progress; V(n) detail is dropped.
type writerLogger struct{ w io.Writer }

func (l writerLogger) Warn(m string)                        { fmt.Fprintln(l.w, m) }
func (l writerLogger) Warnf(f string, a ...interface{})     { fmt.Fprintf(l.w, f+"\n", a...) }
func (l writerLogger) Error(m string)                       { fmt.Fprintln(l.w, m) }
func (l writerLogger) Errorf(f string, a ...interface{})    { fmt.Fprintf(l.w, f+"\n", a...) }
func (l writerLogger) V(v kindlog.Level) kindlog.InfoLogger { return infoLogger{l.w, v == 0} }

type infoLogger struct {
	w  io.Writer
	on bool
}

func (l infoLogger) Info(m string) {
	if l.on {
		fmt.Fprintln(l.w, m)
	}
}
func (l infoLogger) Infof(f string, a ...interface{}) {
	if l.on {
		fmt.Fprintf(l.w, f+"\n", a...)
	}
}
func (l infoLogger) Enabled() bool { return l.on }
