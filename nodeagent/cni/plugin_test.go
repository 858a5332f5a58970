package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/containernetworking/cni/pkg/skel"
)

// fakeAdmitter stands in for the agent behind a real unix socket.
type fakeAdmitter struct {
	mu       sync.Mutex
	adds     []AddRequest
	dels     []DelRequest
	err      error
	resp     AddResponse
	blockFor time.Duration
}

func (f *fakeAdmitter) Admit(ctx context.Context, req AddRequest) (AddResponse, error) {
	f.mu.Lock()
	f.adds = append(f.adds, req)
	err, resp, block := f.err, f.resp, f.blockFor
	f.mu.Unlock()
	select {
	case <-time.After(block):
	case <-ctx.Done():
		return AddResponse{}, ctx.Err()
	}
	return resp, err
}

func (f *fakeAdmitter) Release(req DelRequest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dels = append(f.dels, req)
}

func serveFake(t *testing.T, a Admitter) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi, err)
	}
	srv := &http.Server{Handler: Handler(a, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// bridgePrev is what the bridge plugin (0.4.0) hands the next plugin.
const bridgePrev = `{"cniVersion":"0.4.0","interfaces":[{"name":"kebpf0","mac":"aa:bb:cc:dd:ee:01"},{"name":"veth1234","mac":"aa:bb:cc:dd:ee:02"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:03","sandbox":"/var/run/netns/cni-1"}],"ips":[{"version":"4","interface":2,"address":"10.244.0.7/24","gateway":"10.244.0.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}`

func conf(sock, marker, prev string) string {
	c := map[string]any{"cniVersion": "0.4.0", "name": "kebpf", "type": PluginType, "socket": sock}
	if marker != "" {
		c["enforcedMarker"] = marker
	}
	if prev != "" {
		c["prevResult"] = json.RawMessage(prev)
	}
	b, _ := json.Marshal(c)
	return string(b)
}

const podArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"

// run runs one command the way the runtime does: CNI_* in the environment,
// the config on stdin, dispatched by skel. It returns what the plugin
// printed and the CNI error skel would print.
func run(t *testing.T, cmd, args, stdin string) (string, error) {
	t.Helper()
	for k, v := range map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/cni-1",
		"CNI_IFNAME": "eth0", "CNI_ARGS": args, "CNI_PATH": "/opt/cni/bin"} {
		t.Setenv(k, v)
	}
	in := filepath.Join(t.TempDir(), "stdin")
	if err := os.WriteFile(in, []byte(stdin), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(in)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vf, err := os.Create(filepath.Join(t.TempDir(), "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer vf.Close()
	var out bytes.Buffer
	p := &Plugin{Out: &out}
	// skel reads os.Stdin and prints VERSION to os.Stdout.
	stdinWas, stdoutWas := os.Stdin, os.Stdout
	os.Stdin, os.Stdout = f, vf
	cerr := skel.PluginMainFuncsWithError(p.Funcs(), Versions, "")
	os.Stdin, os.Stdout = stdinWas, stdoutWas
	version, err := os.ReadFile(vf.Name())
	if err != nil {
		t.Fatal(err)
	}
	out.Write(version)
	if cerr != nil {
		return out.String(), cerr
	}
	return out.String(), nil
}

func cniCode(t *testing.T, err error) uint {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not a CNI error", err)
	}
	return e.Code
}

func TestPluginAddWaitsForAgentAndPassesResultThrough(t *testing.T) {
	f := &fakeAdmitter{resp: AddResponse{Enforced: true, Endpoint: 7, Egress: true}, blockFor: 50 * time.Millisecond}
	sock := serveFake(t, f)
	start := time.Now()
	out, err := run(t, "ADD", podArgs, conf(sock, "", bridgePrev))
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(start) < 50*time.Millisecond {
		t.Error("ADD returned before the agent answered")
	}
	var got, want map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("output %q: %v", out, err)
	}
	json.Unmarshal([]byte(bridgePrev), &want)
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if string(gb) != string(wb) {
		t.Errorf("result\n got %s\nwant %s", gb, wb)
	}
	if len(f.adds) != 1 {
		t.Fatalf("agent got %d adds", len(f.adds))
	}
	req := f.adds[0]
	if req.Namespace != "x" || req.Name != "a" || req.UID != "uid-1" || req.ContainerID != "abc" ||
		strings.Join(req.IPs, ",") != "10.244.0.7" || strings.Join(req.HostInterfaces, ",") != "kebpf0,veth1234" {
		t.Errorf("request %+v", req)
	}
}

func TestPluginAddFailures(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "kebpf_np_ep")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	gone := filepath.Join(t.TempDir(), "no.sock")

	t.Run("agent refuses", func(t *testing.T) {
		sock := serveFake(t, &fakeAdmitter{err: errors.New("policy for pod x/a cannot be programmed: map full")})
		_, err := run(t, "ADD", podArgs, conf(sock, marker, bridgePrev))
		if cniCode(t, err) != codeAgentRefused || !strings.Contains(err.Error(), "map full") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("agent unreachable while enforcement is loaded: fail closed", func(t *testing.T) {
		_, err := run(t, "ADD", podArgs, conf(gone, marker, bridgePrev))
		if cniCode(t, err) != codeTryAgain || !strings.Contains(err.Error(), "unprotected") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("agent unreachable, no enforcement: pass through", func(t *testing.T) {
		out, err := run(t, "ADD", podArgs, conf(gone, marker+".absent", bridgePrev))
		if err != nil || !strings.Contains(out, "10.244.0.7/24") {
			t.Fatalf("out %q err %v", out, err)
		}
	})
	t.Run("not chained", func(t *testing.T) {
		_, err := run(t, "ADD", podArgs, conf(gone, marker, ""))
		if cniCode(t, err) != codeInvalidConfig {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("bad config", func(t *testing.T) {
		// skel rejects a config that is not JSON before calling us, with
		// the spec's code for undecodable input (6, not 7 as when the
		// protocol was hand-written).
		out, err := run(t, "ADD", podArgs, "{not json")
		if cniCode(t, err) != types.ErrDecodingFailure || out != "" {
			t.Fatalf("out %q err %v", out, err)
		}
	})
	t.Run("not a Kubernetes pod: pass through without asking", func(t *testing.T) {
		f := &fakeAdmitter{err: errors.New("must not be called")}
		sock := serveFake(t, f)
		out, err := run(t, "ADD", "IgnoreUnknown=1", conf(sock, marker, bridgePrev))
		if err != nil || !strings.Contains(out, "10.244.0.7/24") || len(f.adds) != 0 {
			t.Fatalf("out %q err %v adds %d", out, err, len(f.adds))
		}
	})
}

func TestPluginDelAlwaysSucceeds(t *testing.T) {
	f := &fakeAdmitter{}
	sock := serveFake(t, f)
	if _, err := run(t, "DEL", podArgs, conf(sock, "", "")); err != nil {
		t.Fatal(err)
	}
	if len(f.dels) != 1 || f.dels[0].Name != "a" || f.dels[0].UID != "uid-1" {
		t.Fatalf("dels %+v", f.dels)
	}
	if _, err := run(t, "DEL", podArgs, conf(filepath.Join(t.TempDir(), "gone.sock"), "", "")); err != nil {
		t.Fatalf("DEL with the agent gone: %v", err)
	}
}

func TestPluginVersion(t *testing.T) {
	out, err := run(t, "VERSION", "", "")
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.SupportedVersions) == 0 {
		t.Fatalf("%q: %v", out, err)
	}
}

// FuzzPlugin: whatever the runtime passes on stdin or in CNI_ARGS, the
// plugin answers with a result or a CNI error, never a panic.
func FuzzPlugin(f *testing.F) {
	f.Add("ADD", podArgs, conf("/nonexistent.sock", "", bridgePrev))
	f.Add("ADD", podArgs, `{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"fe80::1/64"}]}}`)
	f.Add("ADD", "K8S_POD_NAMESPACE=x;K8S_POD_NAME=", `{"prevResult":{"ips":[{"address":"bogus"}]}}`)
	f.Add("DEL", "", `{}`)
	f.Add("CHECK", "", `null`)
	f.Fuzz(func(t *testing.T, cmd, args, stdin string) {
		var out bytes.Buffer
		p := &Plugin{Out: &out, Client: NewClient("/nonexistent/kebpf-fuzz.sock"),
			Stat: func(string) (os.FileInfo, error) { return nil, os.ErrNotExist }}
		fn := map[string]func(*skel.CmdArgs) error{"ADD": p.Add, "DEL": p.Del}[cmd]
		if fn == nil {
			fn = p.nothing
		}
		if err := fn(&skel.CmdArgs{ContainerID: "abc", Args: args, StdinData: []byte(stdin)}); err != nil {
			var e *types.Error
			if !errors.As(err, &e) || cmd == "DEL" {
				t.Fatalf("%s: error %v (a CNI error for ADD, none for DEL)", cmd, err)
			}
			return
		}
		if cmd == "ADD" && !json.Valid(out.Bytes()) {
			t.Fatalf("ADD printed invalid JSON %q", out.String())
		}
	})
}
