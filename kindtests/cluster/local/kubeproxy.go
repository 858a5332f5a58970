package local

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

var _ cluster.KubeProxySwitch = (*Provider)(nil)

// kubeProxy runs in node n's network namespace: its rules are that node's.
func (s *state) kubeProxy(binDir string, n *node) component {
	return component{name: kubeProxyComponent(*n), node: n, bin: filepath.Join(binDir, "kube-proxy"), args: []string{
		"--config", s.nodeDir(*n, "kube-proxy-config.yaml"),
		"--conntrack-max-per-core=0",
	}}
}

// inNodeRun runs argv inside node n and returns its combined output.
func (s *state) inNodeRun(ctx context.Context, n node, argv ...string) (string, error) {
	env, err := s.nodeEnv(n)
	if err != nil {
		return "", err
	}
	full := inNode(argv)
	return runEnv(ctx, env, full[0], full[1:]...)
}

// SetKubeProxy implements cluster.KubeProxySwitch on every node: off stops
// kube-proxy and removes its rules (`kube-proxy --cleanup`, the documented
// way), on starts it again and waits until it has programmed its chains.
func (p *Provider) SetKubeProxy(ctx context.Context, name string, on bool) error {
	s := newState(name)
	if s.alive("kube-apiserver") == 0 {
		return fmt.Errorf("local cluster %q is not running", name)
	}
	nodes := s.nodes()
	marker := s.path("kube-proxy.enabled")
	if !on {
		for _, n := range nodes {
			if err := s.stop(kubeProxyComponent(n), 10*time.Second); err != nil {
				return err
			}
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			// --cleanup exits non-zero when one of its modes had nothing to
			// remove; what counts is that no KUBE-SERVICES chain is left.
			s.inNodeRun(cctx, n, filepath.Join(k8sbin.BinDir(), "kube-proxy"), "--cleanup")
			cancel()
			if _, err := s.inNodeRun(ctx, n, "iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES"); err == nil {
				return fmt.Errorf("kube-proxy --cleanup left the KUBE-SERVICES chain on %s", n.Name)
			}
		}
		if err := os.Remove(marker); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		return fmt.Errorf("record kube-proxy: %w", err)
	}
	for i := range nodes {
		n := nodes[i]
		if _, err := s.start(s.kubeProxy(k8sbin.BinDir(), &n)); err != nil {
			return err
		}
		if err := s.waitFor(ctx, "kube-proxy rules on "+n.Name, 60*time.Second, func() error {
			if err := s.checkExited(kubeProxyComponent(n)); err != nil {
				return backoffStop{err}
			}
			_, err := s.inNodeRun(ctx, n, "iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES")
			return err
		}); err != nil {
			return err
		}
	}
	return nil
}
