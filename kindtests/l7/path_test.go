//go:build linux

package l7

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// l7Path is the whole single-node path with real parts: a "pod" HTTP
// server outside the test cgroups, the bpf/sockmap datapath at a fresh
// cgroup with "app" and "envoy" children, our xDS server, and a real
// Envoy started in the envoy cgroup and configured only through that
// server. Sockets created in app are steered.
type l7Path struct {
	pod       netip.AddrPort
	dp        *sockmap.Objects
	srv       *xds.Server
	ctl       *Control
	envoy     *envoytest.Envoy
	listen    netip.AddrPort
	app       string // cgroup of the clients
	dir       string
	node      string
	accessLog string
}

// startPath brings the path up with handler as the pod and the
// configuration built from input(pod address); it returns once Envoy ACKed
// it and a steered request was answered.
func startPath(t *testing.T, handler http.Handler, input func(pod netip.AddrPort) xds.Input) *l7Path {
	t.Helper()
	bpftest.RequireRoot(t)
	bin := envoytest.Require(t)
	p := &l7Path{dir: t.TempDir(), node: "n1"}

	lis, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	podSrv := &http.Server{Handler: handler}
	podSrv.Protocols = new(http.Protocols)
	podSrv.Protocols.SetHTTP1(true)
	podSrv.Protocols.SetUnencryptedHTTP2(true)
	go podSrv.Serve(lis)
	t.Cleanup(func() { podSrv.Close() })
	p.pod = netip.MustParseAddrPort(lis.Addr().String())

	pinDir := bpftest.PinDir(t)
	cg := bpftest.Cgroup(t)
	p.app = bpftest.SubCgroup(t, cg, "app")
	envoyCg := bpftest.SubCgroup(t, cg, "envoy")
	p.dp, err = sockmap.Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.dp.Close() })
	if err := p.dp.Attach(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sockmap.DetachPinned(pinDir); err != nil {
			t.Errorf("detach sockmap: %v", err)
		}
	})

	ctl, err := NewControl(p.dir, p.node)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	p.srv, p.ctl = ctl.Server, ctl
	bpftest.InCgroup(t, envoyCg, func() {
		p.envoy = envoytest.Start(t, bin, ctl.Bootstrap, ctl.Admin, "KEBPF_NODE="+p.node)
	})
	p.listen = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(envoytest.FreePort(t)))
	p.accessLog = filepath.Join(p.dir, "access.log")

	res, err := xds.Build(input(p.pod), p.node, xds.Options{ListenAddress: p.listen, AccessLogPath: p.accessLog, AccessLogSocket: ctl.Socket})
	if err != nil {
		t.Fatal(err)
	}
	if err := xds.Lint(res); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.srv.Update(ctx, p.node, res); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl.WaitAcked(ctx, res.Version, func() error {
		if ok, err := p.envoy.Exited(); ok {
			return fmt.Errorf("envoy exited: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := Steer(p.dp, bpftest.CgroupID(t, envoyCg), p.listen, p.pod); err != nil {
		t.Fatal(err)
	}
	// The listener appears shortly after the ACK (workers pick it up).
	envoytest.Eventually(t, 10*time.Second, "steered connection accepted", func() error {
		c, err := p.dial(t, context.Background())
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Fprintf(c, "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 64))
		return err
	})
	return p
}

// dial connects to the pod from a socket created in the app cgroup (so it
// is steered).
func (p *l7Path) dial(t *testing.T, ctx context.Context) (c net.Conn, err error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	bpftest.InCgroup(t, p.app, func() { c, err = d.DialContext(ctx, "tcp", p.pod.String()) })
	return c, err
}

// client is an HTTP client whose connections are steered; h2c speaks
// HTTP/2 with prior knowledge (no TLS), else HTTP/1.1.
func (p *l7Path) client(t *testing.T, keepAlive, h2c bool) *http.Client {
	tr := &http.Transport{
		DisableKeepAlives: !keepAlive,
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return p.dial(t, ctx) },
	}
	if h2c {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	return &http.Client{Timeout: 60 * time.Second, Transport: tr}
}

func (p *l7Path) url(path string) string { return fmt.Sprintf("http://%s%s", p.pod, path) }

func (p *l7Path) stats(t *testing.T) sockmap.Stats {
	t.Helper()
	s, err := p.dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
