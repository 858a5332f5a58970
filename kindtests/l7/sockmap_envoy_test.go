//go:build linux

package l7

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"context"
	"fmt"
	"github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
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
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	srv := xds.NewServer(ctx, xds.ServerOptions{})
	sock := filepath.Join(dir, "xds.sock")
	lis, err := xds.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	const node = "n1"
	boot, err := xds.Bootstrap(xds.BootstrapOptions{Node: node, XDSSocket: sock, AdminSocket: filepath.Join(dir, "admin.sock")})
	if err != nil {
		t.Fatal(err)
	}
	var envoy *envoytest.Envoy
	bpftest.InCgroup(t, envoyCg, func() {
		envoy = envoytest.Start(t, bin, boot, filepath.Join(dir, "admin.sock"), "KEBPF_NODE="+node)
	})
	listen := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(envoytest.FreePort(t)))

	res, err := xds.Build(shopInput(podAddr.Addr(), int32(podAddr.Port())), node, xds.Options{ListenAddress: listen, AccessLogPath: filepath.Join(dir, "access.log")})
	if err != nil {
		t.Fatal(err)
	}
	if err := xds.Lint(res); err != nil {
		t.Fatal(err)
	}
	if err := srv.Update(ctx, node, res); err != nil {
		t.Fatal(err)
	}
	envoytest.Eventually(t, 20*time.Second, "envoy acks "+res.Version, func() error {
		if ok, err := envoy.Exited(); ok {
			t.Fatalf("envoy exited: %v", err)
		}
		if st := srv.Status(node); st.AckedVersion != res.Version {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})

	if err := dp.AddEnvoyCgroup(bpftest.CgroupID(t, envoyCg)); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetEnvoy(sockmap.Envoy{Listener: listen}); err != nil {
		t.Fatal(err)
	}
	if err := dp.SetSteered(podAddr); err != nil {
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

// shopInput is one L7Policy selecting the pod shop/api at apiIP:port: GET
// and HEAD under /public/ allowed, everything else denied (403).
func shopInput(apiIP netip.Addr, port int32) xds.Input {
	prefix := "/public/"
	pol := &v1alpha1.L7Policy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api"},
		Spec: v1alpha1.L7PolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}},
			Ports:       []v1alpha1.L7PolicyPort{{Port: port}},
			Rules:       []v1alpha1.HTTPRule{{Methods: []v1alpha1.HTTPMethod{"GET", "HEAD"}, Path: &v1alpha1.HTTPPathMatch{Prefix: &prefix}}},
		},
	}
	return xds.Input{
		Policies: []*v1alpha1.L7Policy{pol},
		Pods:     []xds.Pod{{Namespace: "shop", Name: "api", Node: "n1", Labels: map[string]string{"app": "api"}, IPs: []netip.Addr{apiIP}}},
	}
}
