// Package kube wraps the API calls the commands share: connecting (Conn,
// clients from the kubeconfig flags, typed NodeState access through the
// generated clientset in api/client), preflight checks, server-side apply
// and waiting.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned"
	ebpfv1alpha1 "github.com/kubectl-ebpf/kubectl-ebpf/api/client/versioned/typed/api/v1alpha1"
)

// ProbeTimeout bounds the first request to the cluster, so an unreachable
// API server is reported in seconds rather than after TCP's retries.
const ProbeTimeout = 5 * time.Second

// Clients are the API clients one command run uses.
type Clients struct {
	// Host is the API server URL, used in error messages.
	Host string
	Kube kubernetes.Interface
	// EBPF is the typed clientset of our own API (NodeState).
	EBPF versioned.Interface
	// Dynamic applies the embedded manifests and reads CRDs.
	Dynamic dynamic.Interface
	Mapper  meta.RESTMapper
	// Probe talks to the same server as Kube with ProbeTimeout.
	Probe discovery.DiscoveryInterface
	// Config is the REST config the clients were built from (nil in tests
	// with fake clients): port-forwards dial with it.
	Config *rest.Config
}

// New builds clients from the kubeconfig flags. It makes no API call.
func New(flags *genericclioptions.ConfigFlags) (*Clients, error) {
	cfg, err := flags.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	// client-go's default of 5 requests/s makes the ~30 access reviews of the
	// preflight alone take seconds; kubectl raises it the same way.
	cfg.QPS, cfg.Burst = 50, 100
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	ec, err := versioned.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubectl-ebpf client: %w", err)
	}
	dc, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	mapper, err := flags.ToRESTMapper()
	if err != nil {
		return nil, fmt.Errorf("rest mapper: %w", err)
	}
	pcfg := rest.CopyConfig(cfg)
	pcfg.Timeout = ProbeTimeout
	probe, err := discovery.NewDiscoveryClientForConfig(pcfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	return &Clients{Host: cfg.Host, Kube: kc, EBPF: ec, Dynamic: dc, Mapper: mapper, Probe: probe, Config: cfg}, nil
}

// NodeStates is the typed NodeState client.
func (c *Clients) NodeStates() ebpfv1alpha1.NodeStateInterface {
	return c.EBPF.EbpfV1alpha1().NodeStates()
}

// Reachable checks that the API server answers, returning its version.
func (c *Clients) Reachable(ctx context.Context) (*version.Info, error) {
	type result struct {
		v   *version.Info
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := c.Probe.ServerVersion()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("cannot reach cluster at %s: %s", c.Host, rootCause(r.err))
		}
		slog.Debug("cluster reachable", "server", c.Host, "version", r.v.GitVersion)
		return r.v, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("cannot reach cluster at %s: %w", c.Host, ctx.Err())
	}
}

// rootCause strips client-go's `Get "https://...": ` prefix, which repeats the
// URL the message already names.
func rootCause(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return err.Error()
}
