//go:build linux

package l7

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/sockmap"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// TestIntegrationSockmapEnvoy is the whole single-node L7 path with real
// parts: a client in an "app" cgroup dials the pod (127.0.0.2), the
// bpf/sockmap datapath steers it to a real Envoy (in its own cgroup)
// configured only by our Server with the production listener
// (original_dst + RBAC) and the ORIGINAL_DST cluster, Envoy learns the pod
// through SO_ORIGINAL_DST answered by our getsockopt program, and its own
// upstream connection to the pod is not steered back to itself.
func TestIntegrationSockmapEnvoy(t *testing.T) {
	bpftest.RequireRoot(t)
	bin := envoytest.Require(t)
	dir := t.TempDir()

	// The pod: an HTTP server outside the test cgroups.
	pod, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	podSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		fmt.Fprintf(w, "pod %s %s", req.Method, req.URL.Path)
	})}
	go podSrv.Serve(pod)
	t.Cleanup(func() { podSrv.Close() })
	podAddr := netip.MustParseAddrPort(pod.Addr().String())

	// Datapath at a fresh cgroup with app and envoy children.
	pinDir := bpftest.PinDir(t)
	cg := bpftest.Cgroup(t)
	app := bpftest.SubCgroup(t, cg, "app")
	envoyCg := bpftest.SubCgroup(t, cg, "envoy")
	dp, err := sockmap.Load(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	if err := dp.Attach(cg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sockmap.DetachPinned(pinDir); err != nil {
			t.Errorf("detach sockmap: %v", err)
		}
	})

	// Our xDS server and a real Envoy started inside the envoy cgroup.
	ctl, err := NewControl(dir, "n1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	var envoy *envoytest.Envoy
	bpftest.InCgroup(t, envoyCg, func() {
		envoy = envoytest.Start(t, bin, ctl.Bootstrap, ctl.Admin, "KEBPF_NODE="+ctl.Node)
	})
	listen := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(envoytest.FreePort(t)))

	res, err := xds.Build(Input(podAddr, ctl.Node, "/public/"), ctl.Node, xds.Options{ListenAddress: listen, AccessLogPath: filepath.Join(dir, "access.log")})
	if err != nil {
		t.Fatal(err)
	}
	if err := xds.Lint(res); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ctl.Server.Update(ctx, ctl.Node, res); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl.WaitAcked(ctx, res.Version, func() error {
		if ok, err := envoy.Exited(); ok {
			return fmt.Errorf("envoy exited: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := Steer(dp, bpftest.CgroupID(t, envoyCg), listen, podAddr); err != nil {
		t.Fatal(err)
	}

	// Clients' sockets are created in the app cgroup.
	d := &net.Dialer{Timeout: 5 * time.Second}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			bpftest.InCgroup(t, app, func() { c, err = d.DialContext(ctx, network, addr) })
			return c, err
		},
	}}
	get := func(path string) (int, string, error) {
		resp, err := client.Get(fmt.Sprintf("http://%s%s", podAddr, path))
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	// The listener appears shortly after the ACK (workers pick it up).
	envoytest.Eventually(t, 10*time.Second, "steered request answered", func() error {
		_, _, err := get("/public/ready")
		return err
	})
	before, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want int
		body string
	}{
		{"/public/index.html", 200, "pod GET /public/index.html"},
		{"/private", 403, "RBAC: access denied"},
	} {
		code, body, err := get(tc.path)
		if err != nil || code != tc.want || !strings.Contains(body, tc.body) {
			t.Errorf("GET %s via steering: %d %q %v; want %d %q", tc.path, code, body, err, tc.want, tc.body)
		}
	}
	after, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("datapath stats %+v", after)
	// Two steered connections, each answered SO_ORIGINAL_DST and carried by
	// sk_msg; the allowed one made Envoy connect to the pod (not steered).
	if after.Steered-before.Steered != 2 || after.OrigDst-before.OrigDst < 2 ||
		after.Redirected == before.Redirected || after.EnvoySkipped == 0 {
		t.Errorf("stats before %+v after %+v: want 2 steered, 2 SO_ORIGINAL_DST answers, sk_msg redirects, Envoy's upstream skipped", before, after)
	}
}
