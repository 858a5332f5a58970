// Package auto picks the cluster provider for this machine: kind where a
// container engine can run privileged containers, else the Docker-free local
// node. $KEBPF_PROVIDER (kind|local) overrides the choice.
package auto

import (
	"context"
	"fmt"
	"os"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster/kind"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster/local"
)

// EnvProvider names the environment variable that forces a provider.
const EnvProvider = "KEBPF_PROVIDER"

// ByName returns the provider called name.
func ByName(name string) (cluster.Provider, error) {
	switch name {
	case "kind":
		return kind.New(), nil
	case "local":
		return local.New(), nil
	}
	return nil, fmt.Errorf("unknown cluster provider %q (want kind or local)", name)
}

// Select returns the provider named by override (or $KEBPF_PROVIDER when
// override is empty), else the first available of kind and local. The reason a
// provider was passed over is returned for the caller to print.
func Select(ctx context.Context, override string) (p cluster.Provider, why string, err error) {
	if override == "" {
		override = os.Getenv(EnvProvider)
	}
	if override != "" {
		p, err := ByName(override)
		if err != nil {
			return nil, "", err
		}
		if err := p.Available(ctx); err != nil {
			return nil, "", fmt.Errorf("provider %s cannot run here: %w", override, err)
		}
		return p, "selected by " + EnvProvider, nil
	}
	k := kind.New()
	kerr := k.Available(ctx)
	if kerr == nil {
		return k, "a container engine that runs privileged containers is present", nil
	}
	l := local.New()
	if lerr := l.Available(ctx); lerr != nil {
		return nil, "", fmt.Errorf("no cluster provider can run here: kind: %v; local: %v", kerr, lerr)
	}
	return l, "kind unavailable (" + kerr.Error() + ")", nil
}
