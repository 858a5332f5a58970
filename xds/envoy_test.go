package xds

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	alsdata "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// envoyRig is a Server on a unix socket, an upstream HTTP server and a real
// Envoy bootstrapped to the Server.
//
// How the request reaches the filter chain without SO_ORIGINAL_DST: the
// test's "pod" is 127.0.0.1 on Envoy's own listener port, so the chain
// matches the plain connection (getsockopt fails, the original_dst filter
// keeps the local address), and Options.Upstream routes to a static cluster
// instead of the ORIGINAL_DST one (which would loop back to the listener).
// Everything else is the production configuration. The answer of
// SO_ORIGINAL_DST by our cgroup/getsockopt program is the datapath's test.
type envoyRig struct {
	srv       *Server
	envoy     *envoytest.Envoy
	node      string
	port      int
	upstream  netip.AddrPort
	accessLog string
	sock      string
	statuses  chan NodeStatus

	alsMu sync.Mutex
	als   []alsEntry
}

type alsEntry struct {
	node  string
	entry *alsdata.HTTPAccessLogEntry
}

func newEnvoyRig(t *testing.T, delta bool) *envoyRig {
	t.Helper()
	bin := envoytest.Require(t)
	dir := t.TempDir()
	r := &envoyRig{node: "n1", port: envoytest.FreePort(t), accessLog: filepath.Join(dir, "access.log"), statuses: make(chan NodeStatus, 1000)}

	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		fmt.Fprintf(w, "upstream %s %s", req.Method, req.URL.Path)
	})}
	ul, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(ul)
	t.Cleanup(func() { up.Close() })
	r.upstream = netip.MustParseAddrPort(ul.Addr().String())

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	r.srv = NewServer(ctx, ServerOptions{
		OnStatus: func(s NodeStatus) {
			select {
			case r.statuses <- s:
			default:
			}
		},
		OnAccessLog: func(node string, e *alsdata.HTTPAccessLogEntry) {
			r.alsMu.Lock()
			r.als = append(r.als, alsEntry{node, e})
			r.alsMu.Unlock()
		},
	})
	sock := filepath.Join(dir, "xds.sock")
	r.sock = sock
	lis, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	go r.srv.Serve(lis)
	t.Cleanup(r.srv.Stop)

	boot, err := Bootstrap(BootstrapOptions{Node: r.node, XDSSocket: sock, AdminSocket: filepath.Join(dir, "admin.sock"), Delta: delta})
	if err != nil {
		t.Fatal(err)
	}
	r.envoy = envoytest.Start(t, bin, boot, filepath.Join(dir, "admin.sock"), "KEBPF_NODE="+r.node)
	return r
}

func (r *envoyRig) options() Options {
	return Options{
		ListenAddress:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(r.port)),
		AccessLogPath:   r.accessLog,
		AccessLogSocket: r.sock,
		Upstream:        r.upstream,
	}
}

func (r *envoyRig) build(t *testing.T, in Input) *Resources {
	t.Helper()
	res, err := Build(in, r.node, r.options())
	if err != nil {
		t.Fatal(err)
	}
	if err := Lint(res); err != nil {
		t.Fatalf("lint: %v", err)
	}
	return res
}

func (r *envoyRig) waitAcked(t *testing.T, version string) {
	t.Helper()
	envoytest.Eventually(t, 20*time.Second, "envoy acks "+version, func() error {
		if ok, err := r.envoy.Exited(); ok {
			t.Fatalf("envoy exited: %v", err)
		}
		if st := r.srv.Status(r.node); st.AckedVersion != version {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
}

func (r *envoyRig) do(t *testing.T, method, path string, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", r.port, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	var resp *http.Response
	// The listener appears shortly after the ACK (workers pick it up).
	envoytest.Eventually(t, 10*time.Second, "connect to envoy listener", func() error {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err = c.Do(req)
		return err
	})
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

type accessEntry map[string]any

func (r *envoyRig) accessEntries(t *testing.T) []accessEntry {
	t.Helper()
	f, err := os.Open(r.accessLog)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []accessEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e accessEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("access log line is not JSON: %q: %v", sc.Text(), err)
		}
		out = append(out, e)
	}
	return out
}

// findEntry waits for the access log line of method+path (Envoy flushes
// the file log on a timer).
func (r *envoyRig) findEntry(t *testing.T, method, path string) accessEntry {
	t.Helper()
	var found accessEntry
	envoytest.Eventually(t, 15*time.Second, "access log entry for "+method+" "+path, func() error {
		for _, e := range r.accessEntries(t) {
			if e["method"] == method && e["path"] == path {
				found = e
				return nil
			}
		}
		return fmt.Errorf("not in %s", r.accessLog)
	})
	return found
}

// findALS waits for the ALS entry of method+path.
func (r *envoyRig) findALS(t *testing.T, method, path string) alsEntry {
	t.Helper()
	var found alsEntry
	envoytest.Eventually(t, 15*time.Second, "ALS entry for "+method+" "+path, func() error {
		r.alsMu.Lock()
		defer r.alsMu.Unlock()
		for _, e := range r.als {
			if e.entry.GetRequest().GetRequestMethod().String() == method && e.entry.GetRequest().GetPath() == path {
				found = e
				return nil
			}
		}
		return fmt.Errorf("%d entries, none matches", len(r.als))
	})
	return found
}

func TestIntegrationEnvoyEnforcesL7Policy(t *testing.T) {
	for _, delta := range []bool{false, true} {
		t.Run(map[bool]string{false: "sotw", true: "delta"}[delta], func(t *testing.T) {
			r := newEnvoyRig(t, delta)
			res := r.build(t, shopInput(netip.MustParseAddr("127.0.0.1"), int32(r.port)))
			if err := r.srv.Update(context.Background(), r.node, res); err != nil {
				t.Fatal(err)
			}
			r.waitAcked(t, res.Version)

			for _, tc := range []struct {
				method, path string
				hdr          map[string]string
				want         int
			}{
				{"GET", "/public/index.html", nil, 200},
				{"HEAD", "/public/", nil, 200},
				{"GET", "/private", nil, 403},
				{"DELETE", "/public/x", nil, 403},
				{"POST", "/orders/42", map[string]string{"X-Tenant": "a"}, 200},
				{"POST", "/orders/42", map[string]string{"X-Tenant": "b"}, 403},
				{"POST", "/orders/42", map[string]string{"X-Tenant": "a", "X-Debug": "1"}, 403},
				{"POST", "/orders/abc", map[string]string{"X-Tenant": "a"}, 403},
				{"GET", "/internal", nil, 403}, // only pods web and namespace ops; we are 127.0.0.1
			} {
				code, body := r.do(t, tc.method, tc.path, tc.hdr)
				if code != tc.want {
					t.Errorf("%s %s %v: got %d %q, want %d", tc.method, tc.path, tc.hdr, code, body, tc.want)
				}
				if code == 403 && !strings.Contains(body, "RBAC: access denied") {
					t.Errorf("%s %s: 403 body %q is not Envoy's RBAC denial", tc.method, tc.path, body)
				}
			}

			allowed := r.findEntry(t, "GET", "/public/index.html")
			denied := r.findEntry(t, "GET", "/private")
			t.Logf("allowed: %v", allowed)
			t.Logf("denied: %v", denied)
			if fmt.Sprint(allowed["response_code"]) != "200" || !strings.Contains(fmt.Sprint(allowed["rbac"]), "shop/api/0") {
				t.Errorf("allowed entry does not name policy shop/api/0: %v", allowed)
			}
			if fmt.Sprint(denied["response_code"]) != "403" ||
				!strings.Contains(fmt.Sprint(denied["response_details"]), "rbac_access_denied_matched_policy") ||
				denied["l7policies"] != "shop/api" {
				t.Errorf("denied entry does not carry the RBAC denial and the L7Policy: %v", denied)
			}

			// The same decisions over gRPC ALS on the xDS socket.
			a := r.findALS(t, "GET", "/public/index.html")
			rbacMD := a.entry.GetCommonProperties().GetMetadata().GetFilterMetadata()[rbacMetadataNamespace].GetFields()
			if a.node != r.node || a.entry.GetResponse().GetResponseCode().GetValue() != 200 || rbacMD["enforced_effective_policy_id"].GetStringValue() != "shop/api/0" {
				t.Errorf("ALS allowed entry: node %q %v", a.node, a.entry)
			}
			d := r.findALS(t, "GET", "/private")
			if d.entry.GetResponse().GetResponseCode().GetValue() != 403 || d.entry.GetResponse().GetResponseCodeDetails() != "rbac_access_denied_matched_policy[none]" ||
				d.entry.GetCommonProperties().GetCustomTags()[ALSTagL7Policies] != "shop/api" || d.entry.GetCommonProperties().GetCustomTags()[ALSTagPod] != "shop/api" {
				t.Errorf("ALS denied entry: %v", d.entry)
			}
		})
	}
}

// TestIntegrationEnvoyAcksRandomPolicies feeds Envoy a sample of the
// builder's outputs for random valid policies (FuzzBuild's generator): each
// must be ACKed, none NACKed.
func TestIntegrationEnvoyAcksRandomPolicies(t *testing.T) {
	r := newEnvoyRig(t, false)
	rng := rand.New(rand.NewPCG(2026, 12))
	strs := []string{"api", "v1/items", "a-b_c", "/x", "tenant-7"}
	seen := map[string]bool{}
	chains := 0
	for i := 0; i < 80; i++ {
		in := randomInput(rng, strs)
		res := r.build(t, in)
		if seen[res.Version] {
			continue
		}
		seen[res.Version] = true
		chains += len(res.Listeners[0].FilterChains)
		if err := r.srv.Update(context.Background(), r.node, res); err != nil {
			t.Fatal(err)
		}
		envoytest.Eventually(t, 20*time.Second, "envoy acks random config "+res.Version, func() error {
			st := r.srv.Status(r.node)
			if st.NackedVersion == res.Version {
				t.Fatalf("envoy rejected a valid config: %s", st.Message)
			}
			if st.AckedVersion != res.Version {
				return errStatus(st)
			}
			return nil
		})
	}
	t.Logf("envoy ACKed %d distinct random configurations (%d filter chains in all)", len(seen), chains)
}

// TestIntegrationEnvoyUnselectedFailsClosed: a connection steered to Envoy
// whose destination no L7Policy selects lands in the default chain: 403,
// logged with the chain "unselected" and no L7Policy, never forwarded.
func TestIntegrationEnvoyUnselectedFailsClosed(t *testing.T) {
	r := newEnvoyRig(t, false)
	// The policy selects 10.0.1.10; the test's connections arrive for 127.0.0.1.
	res := r.build(t, shopInput(netip.MustParseAddr("10.0.1.10"), int32(r.port)))
	if err := r.srv.Update(context.Background(), r.node, res); err != nil {
		t.Fatal(err)
	}
	r.waitAcked(t, res.Version)
	if code, body := r.do(t, "GET", "/public/x", nil); code != 403 {
		t.Fatalf("unselected destination: %d %q, want 403", code, body)
	}
	e := r.findEntry(t, "GET", "/public/x")
	if e["filter_chain"] != DefaultChainName || e["l7policies"] != "" || e["upstream_host"] != nil {
		t.Errorf("access log entry %v", e)
	}
}
