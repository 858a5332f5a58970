package local

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

var _ cluster.KubeProxySwitch = (*Provider)(nil)

func (s *state) kubeProxy(binDir string) component {
	return component{name: "kube-proxy", bin: filepath.Join(binDir, "kube-proxy"), args: []string{
		"--config", s.path("kube-proxy-config.yaml"),
		"--conntrack-max-per-core=0",
	}}
}

// SetKubeProxy implements cluster.KubeProxySwitch: off stops kube-proxy and
// removes its rules (`kube-proxy --cleanup`, the documented way), on starts it
// again and waits until it has programmed its chains.
func (p *Provider) SetKubeProxy(ctx context.Context, name string, on bool) error {
	s := newState(name)
	if s.alive("kube-apiserver") == 0 {
		return fmt.Errorf("local cluster %q is not running", name)
	}
	marker := s.path("kube-proxy.enabled")
	if !on {
		if err := s.stop("kube-proxy", 10*time.Second); err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		// --cleanup exits non-zero when one of its modes had nothing to remove;
		// what counts is that no KUBE-SERVICES chain is left.
		exec.CommandContext(cctx, filepath.Join(k8sbin.BinDir(), "kube-proxy"), "--cleanup").Run()
		if err := exec.CommandContext(ctx, "iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES").Run(); err == nil {
			return errors.New("kube-proxy --cleanup left the KUBE-SERVICES chain")
		}
		if err := os.Remove(marker); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		return fmt.Errorf("record kube-proxy: %w", err)
	}
	if _, err := s.start(s.kubeProxy(k8sbin.BinDir())); err != nil {
		return err
	}
	return s.waitFor(ctx, "kube-proxy rules", 60*time.Second, func() error {
		if err := s.checkExited("kube-proxy"); err != nil {
			return backoffStop{err}
		}
		return exec.CommandContext(ctx, "iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES").Run()
	})
}
