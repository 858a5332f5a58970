package local

import (
	"context"
	"fmt"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/k8sbin"
)

var _ cluster.APIServerSwitch = (*Provider)(nil)

// SetAPIServer implements cluster.APIServerSwitch: off stops kube-apiserver
// (SIGTERM, then SIGKILL after 10 s) and leaves everything else running,
// as an outage of the control plane does; on starts it with the same
// flags and waits for /readyz.
func (p *Provider) SetAPIServer(ctx context.Context, name string, on bool) error {
	s := newState(name)
	if s.alive("etcd") == 0 {
		return fmt.Errorf("local cluster %q is not running", name)
	}
	if !on {
		return s.stop("kube-apiserver", 10*time.Second)
	}
	if _, err := s.start(s.apiServer(k8sbin.BinDir())); err != nil {
		return err
	}
	_, err := s.waitAPIServer(ctx)
	return err
}
