//go:build linux

package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// dialInNetns dials from a thread switched into the client netns. A socket
// keeps the netns it was created in, so once connected the thread switches
// back and the connection is used from any goroutine.
func (e *env) dialInNetns(ctx context.Context, network, addr string) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, err}
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + e.nsC)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, fmt.Errorf("setns %s: %w", e.nsC, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			// Only a thread back in the host netns may serve other goroutines;
			// otherwise it stays locked and exits with this goroutine.
			runtime.UnlockOSThread()
		}
		ch <- res{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
