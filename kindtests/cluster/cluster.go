// Package cluster defines the one interface every local Kubernetes cluster
// provider implements, so the e2e suite, the demo and `make cluster-up` run the
// same way on kind (where a container engine can run privileged containers) and
// on the Docker-free single node used on CI machines.
package cluster

import (
	"context"
	"io"
	"os"
	"path/filepath"
)

// DefaultName is the cluster name used by make, the demo and the e2e suite.
const DefaultName = "kebpf"

// Options configure Create.
type Options struct {
	// Name of the cluster; providers key all their state by it.
	Name string
	// KubeProxy runs kube-proxy on the nodes (the peer our socket LB replaces).
	KubeProxy bool
	// Nodes is how many nodes the cluster has (0 means 1).
	Nodes int
	// Log receives human-readable progress lines (one per step, with timings).
	Log io.Writer
}

// Cluster is a running cluster.
type Cluster struct {
	Name     string
	Provider string
	// Kubeconfig is the path of an admin kubeconfig for the cluster.
	Kubeconfig string
	// Nodes are the Kubernetes node names.
	Nodes []string
}

// Provider creates and destroys local clusters.
type Provider interface {
	// Name is the provider's name ("kind" or "local").
	Name() string
	// Available returns nil when the provider can create clusters on this
	// machine, else an error saying what is missing.
	Available(ctx context.Context) error
	// Create brings a cluster up and waits until every node is Ready. If a
	// healthy cluster of that name already runs it is reused. On error,
	// whatever was created stays recorded so Delete can remove it.
	Create(ctx context.Context, opts Options) (*Cluster, error)
	// Delete removes everything Create made (processes, interfaces, routes,
	// firewall rules, mounts, sysctls, containers), also after a failed or
	// interrupted Create. Deleting a cluster that does not exist is not an error.
	Delete(ctx context.Context, name string, log io.Writer) error
	// LoadImages makes docker-archive image tarballs available to every node's
	// container runtime, so pods can use them with imagePullPolicy IfNotPresent.
	LoadImages(ctx context.Context, name string, tarballs []string) error
	// Exec runs a command on a node (as root) and returns its combined output,
	// so tests can prove node state (pins, attached programs) on the node itself.
	Exec(ctx context.Context, name, node string, argv ...string) ([]byte, error)
}

// CacheDir is where builds (Kubernetes binaries, images) are cached between
// runs: $KEBPF_CACHE_DIR, else $HOME/.cache/kubectl-ebpf.
func CacheDir() string {
	if d := os.Getenv("KEBPF_CACHE_DIR"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "kubectl-ebpf")
}

// APIServerSwitch is implemented by providers that can stop and start the
// cluster's API server, for outage tests.
type APIServerSwitch interface {
	// SetAPIServer stops the API server (off) or starts it again and
	// waits until it is ready (on).
	SetAPIServer(ctx context.Context, name string, on bool) error
}

// KubeProxySwitch is implemented by providers that can stop and start
// kube-proxy on a running cluster, so the socket-LB suite runs the same flows
// without kube-proxy (our datapath alone) and beside it.
type KubeProxySwitch interface {
	// SetKubeProxy stops kube-proxy and removes its rules (on=false), or
	// starts it and waits until its rules are programmed (on=true).
	SetKubeProxy(ctx context.Context, name string, on bool) error
}

// EnvCreateInTests is the environment variable that lets a test create a
// local cluster (`make root` and `make e2e` set it to 1). Only one cluster
// fits on a host, so a plain `go test ./...` never creates one.
const EnvCreateInTests = "KEBPF_E2E"

// CreateInTests reports whether tests may create a cluster; when not, the
// reason says how to run them.
func CreateInTests() (ok bool, reason string) {
	if os.Getenv(EnvCreateInTests) == "1" {
		return true, ""
	}
	return false, "creates a local cluster: run make e2e / make root (or set " + EnvCreateInTests + "=1)"
}
