//go:build linux

package l7

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// The wiring of the single-node L7 path that both the root test here and
// the benchmark (kindtests/bench, mode l7) use: our xDS server for one
// node's Envoy, the policy input, and the datapath pointed at that Envoy.
// Nothing here takes a testing.TB: the benchmark runs outside `go test`.

// Input is one L7Policy shop/api selecting the pod shop/api (on node) at
// pod's address and port: GET and HEAD under each of prefixes allowed, every
// other request denied (403); no prefix, a policy without rules, denies
// everything.
func Input(pod netip.AddrPort, node string, prefixes ...string) xds.Input {
	pol := &v1alpha1.L7Policy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api"},
		Spec: v1alpha1.L7PolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Ports:       []v1alpha1.L7PolicyPort{{Port: int32(pod.Port())}},
		},
	}
	for _, p := range prefixes {
		pol.Spec.Rules = append(pol.Spec.Rules, v1alpha1.HTTPRule{Methods: []v1alpha1.HTTPMethod{"GET", "HEAD"}, Path: &v1alpha1.HTTPPathMatch{Prefix: &p}})
	}
	return xds.Input{
		Policies: []*v1alpha1.L7Policy{pol},
		Pods:     []xds.Pod{{Namespace: "shop", Name: "api", Node: node, Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{pod.Addr()}}},
	}
}

// Control is our xDS server on a unix socket and the bootstrap of the one
// node's Envoy it configures. It records when that Envoy ACKed each
// version (the server's OnStatus), so a caller can time Update to ACK.
type Control struct {
	Server    *xds.Server
	Node      string
	Socket    string // the xDS socket
	Admin     string // Envoy's admin socket (bootstrap)
	Bootstrap []byte

	// als receives the node's Envoy access log entries (gRPC ALS on the
	// xDS socket, xds.Options.AccessLogSocket) once SetAccessLog set it.
	als atomic.Pointer[func(string, *alsdata.HTTPAccessLogEntry)]

	mu      sync.Mutex
	lastAck string
	acked   map[string]time.Time // version → when the node last ACKed it
	changed chan struct{}        // a token after every new ACK
	stop    func()
}

// NewControl serves xDS for node on dir/xds.sock; Envoy's admin socket is
// dir/admin.sock. Close stops it.
func NewControl(dir, node string) (*Control, error) {
	c := &Control{Node: node, Socket: filepath.Join(dir, "xds.sock"), Admin: filepath.Join(dir, "admin.sock"),
		acked: map[string]time.Time{}, changed: make(chan struct{}, 1)}
	boot, err := xds.Bootstrap(xds.BootstrapOptions{Node: node, XDSSocket: c.Socket, AdminSocket: c.Admin})
	if err != nil {
		return nil, err
	}
	c.Bootstrap = boot
	lis, err := xds.ListenUnix(c.Socket)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.Server = xds.NewServer(ctx, xds.ServerOptions{OnStatus: c.onStatus, OnAccessLog: func(node string, e *alsdata.HTTPAccessLogEntry) {
		if f := c.als.Load(); f != nil {
			(*f)(node, e)
		}
	}})
	go c.Server.Serve(lis)
	c.stop = func() { c.Server.Stop(); cancel() }
	return c, nil
}

// SetAccessLog hands every later ALS entry to f (from the stream's
// goroutine; it must not block).
func (c *Control) SetAccessLog(f func(node string, e *alsdata.HTTPAccessLogEntry)) { c.als.Store(&f) }

// Close stops the server.
func (c *Control) Close() { c.stop() }

// onStatus runs under the server's lock: it records and signals, never
// blocks.
func (c *Control) onStatus(st xds.NodeStatus) {
	if st.Node != c.Node || st.AckedVersion == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.AckedVersion == c.lastAck {
		return
	}
	c.lastAck = st.AckedVersion
	c.acked[st.AckedVersion] = time.Now()
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// WaitAcked waits until the node's Envoy has ACKed version and returns when
// the server saw that ACK. alive, polled meanwhile, ends the wait early
// with its error (an Envoy that exited).
func (c *Control) WaitAcked(ctx context.Context, version string, alive func() error) (time.Time, error) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		c.mu.Lock()
		at, ok := c.acked[version]
		c.mu.Unlock()
		if ok {
			return at, nil
		}
		if err := alive(); err != nil {
			return time.Time{}, err
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("envoy never acked %s: %w (status %+v)", version, ctx.Err(), c.Server.Status(c.Node))
		case <-c.changed:
		case <-tick.C:
		}
	}
}

// Steer points the datapath at the Envoy listening at listen, exempts the
// sockets of Envoy's cgroup (its upstream connects to the pods) and steers
// connections to pods.
func Steer(dp *sockmap.Objects, envoyCgroup uint64, listen netip.AddrPort, pods ...netip.AddrPort) error {
	errs := []error{dp.AddEnvoyCgroup(envoyCgroup), dp.SetEnvoy(sockmap.Envoy{Listener: listen})}
	for _, p := range pods {
		errs = append(errs, dp.SetSteered(p))
	}
	return errors.Join(errs...)
}
