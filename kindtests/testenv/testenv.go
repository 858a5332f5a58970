// Package testenv brings up everything the e2e suite and the demo need in one
// call: a local cluster from the provider this machine supports, the product's
// images built from this tree and loaded into the nodes, and a bin directory
// holding `kubectl` (built from the pinned k8s.io/kubernetes module) and
// `kubectl-ebpf`, so the plugin runs through kubectl's real plugin mechanism.
package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster/auto"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/images"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

// Env is a running environment, recorded on disk so `make cluster-down`, a
// later test run and the demo find it again.
type Env struct {
	Name     string          `json:"name"`
	Provider string          `json:"provider"`
	Cluster  cluster.Cluster `json:"cluster"`
	// BinDir holds kubectl and kubectl-ebpf; put it first on PATH.
	BinDir  string         `json:"binDir"`
	Product images.Product `json:"product"`
}

func recordPath(name string) string {
	return filepath.Join(cluster.CacheDir(), "clusters", name+".json")
}

// Load returns the recorded environment called name.
func Load(name string) (*Env, error) {
	b, err := os.ReadFile(recordPath(name))
	if err != nil {
		return nil, err
	}
	var e Env
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, fmt.Errorf("read %s: %w", recordPath(name), err)
	}
	return &e, nil
}

func (e *Env) save() error {
	if err := os.MkdirAll(filepath.Dir(recordPath(e.Name)), 0o755); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(e, "", "  ")
	return os.WriteFile(recordPath(e.Name), b, 0o644)
}

// Options configure Up.
type Options struct {
	Name      string
	Provider  string // "", "kind" or "local"
	KubeProxy bool
	// Nodes is how many nodes the cluster has (0: the provider's default).
	Nodes int
	Log   io.Writer
}

func step(log io.Writer, start time.Time, format string, a ...any) {
	fmt.Fprintf(log, "[%6.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
}

// Up creates (or reuses) the cluster, builds and loads the images and the
// binaries. The provider is recorded before the cluster is created, so Down
// can tear down a half-created cluster.
func Up(ctx context.Context, o Options) (*Env, error) {
	start := time.Now()
	if o.Log == nil {
		o.Log = io.Discard
	}
	p, why, err := auto.Select(ctx, o.Provider)
	if err != nil {
		return nil, err
	}
	step(o.Log, start, "provider %s: %s", p.Name(), why)
	root, err := images.ModuleRoot(ctx)
	if err != nil {
		return nil, err
	}
	e := &Env{Name: o.Name, Provider: p.Name(), BinDir: filepath.Join(cluster.CacheDir(), "bin", o.Name)}
	if old, err := Load(o.Name); err == nil && old.Provider != p.Name() {
		return nil, fmt.Errorf("cluster %s was created by provider %s: run make cluster-down first", o.Name, old.Provider)
	}
	if err := e.save(); err != nil {
		return nil, err
	}

	k8sDir, err := k8sbin.Ensure(ctx, o.Log)
	if err != nil {
		return nil, err
	}
	step(o.Log, start, "kubernetes binaries ready in %s", k8sDir)

	version := images.SourceVersion(ctx, root)
	prod, err := images.BuildProduct(ctx, root, filepath.Join(cluster.CacheDir(), "images", o.Name), version)
	if err != nil {
		return nil, err
	}
	e.Product = prod
	step(o.Log, start, "built images %s, %s, %s", prod.AgentRef, prod.TestServerRef, prod.EnvoyRef)
	if err := os.MkdirAll(e.BinDir, 0o755); err != nil {
		return nil, err
	}
	if err := images.GoBuild(ctx, root, "./plugin/cmd/kubectl-ebpf", filepath.Join(e.BinDir, "kubectl-ebpf"), version); err != nil {
		return nil, err
	}
	if err := linkInto(filepath.Join(k8sDir, "kubectl"), filepath.Join(e.BinDir, "kubectl")); err != nil {
		return nil, err
	}
	if err := linkInto(filepath.Join(root, "plugin", "kubectl_complete-ebpf"), filepath.Join(e.BinDir, "kubectl_complete-ebpf")); err != nil {
		return nil, err
	}
	step(o.Log, start, "built kubectl-ebpf %s into %s", version, e.BinDir)

	c, err := p.Create(ctx, cluster.Options{Name: o.Name, KubeProxy: o.KubeProxy, Nodes: o.Nodes, Log: o.Log})
	if err != nil {
		return nil, err
	}
	e.Cluster = *c
	if err := e.save(); err != nil {
		return nil, err
	}
	step(o.Log, start, "cluster %s up (nodes: %s)", c.Name, strings.Join(c.Nodes, ", "))
	if err := p.LoadImages(ctx, o.Name, prod.Tarballs()); err != nil {
		return nil, err
	}
	step(o.Log, start, "images loaded into every node")
	return e, nil
}

func linkInto(src, dst string) error {
	if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.Symlink(src, dst)
}

// Down tears the environment called name down and forgets it. With no record
// it still asks the provider this machine would pick, so a cluster left by an
// interrupted run is removed.
func Down(ctx context.Context, name, provider string, log io.Writer) error {
	if log == nil {
		log = io.Discard
	}
	if e, err := Load(name); err == nil && provider == "" {
		provider = e.Provider
	}
	var p cluster.Provider
	var err error
	if provider != "" {
		p, err = auto.ByName(provider)
	} else {
		p, _, err = auto.Select(ctx, "")
	}
	if err != nil {
		return err
	}
	if err := p.Delete(ctx, name, log); err != nil {
		return err
	}
	if err := os.Remove(recordPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// ProviderOf returns the provider of a recorded environment.
func (e *Env) ProviderOf() (cluster.Provider, error) { return auto.ByName(e.Provider) }
