//go:build linux

package bench

import (
	"context"
	"net"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
)

// dialInNetns dials from a thread switched into the client netns. A socket
// keeps the netns it was created in, so once connected the connection is
// used from any goroutine.
func (e *env) dialInNetns(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := netnsutil.Do(netnsutil.Path(e.nsC), func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
