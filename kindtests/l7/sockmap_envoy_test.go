//go:build linux

package l7

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds"
)

// TestIntegrationSockmapEnvoy is the whole single-node L7 path with real
// parts: a client in an "app" cgroup dials the pod (127.0.0.2), the
// bpf/sockmap datapath steers it to a real Envoy (in its own cgroup)
// configured only by our Server with the production listener
// (original_dst + RBAC) and the ORIGINAL_DST cluster, Envoy learns the pod
// through SO_ORIGINAL_DST answered by our getsockopt program, and its own
// upstream connection to the pod is not steered back to itself.
func TestIntegrationSockmapEnvoy(t *testing.T) {
	p := startPath(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		fmt.Fprintf(w, "pod %s %s", req.Method, req.URL.Path)
	}), func(pod netip.AddrPort) xds.Input { return Input(pod, "n1", "/public/") })
	client := p.client(t, false, false)
	get := func(path string) (int, string, error) {
		resp, err := client.Get(p.url(path))
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	dp := p.dp
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
