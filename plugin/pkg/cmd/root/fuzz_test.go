package root_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/client-go/rest"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/root"
	// Its init gives the test binary a version, as a release build has, so
	// install gets past "no version" to its flags and the cluster.
	_ "github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

// fuzzVocab is what FuzzArgs picks tokens from (besides raw junk): every
// command, every flag of the tree, and values each flag accepts or rejects.
// Flags naming files the run would read or write (--kubeconfig, --cache-dir,
// the TLS files) are left out: argv must not point the run at this host's
// files; the network is cut off below whatever argv says.
var fuzzVocab = []string{
	"install", "enable", "disable", "status", "trace", "policy", "uninstall", "version",
	"completion", "bash", "zsh", "fish", "powershell", "help", "__complete", "__completeNoDesc",
	"service-lb", "policy", "l7", "all", "SERVICE-LB", "",
	"--help", "-h", "-v", "--v", "-v=1", "-v=6", "-v=-1", "-n", "--namespace", "-n=kube-system", "--namespace=a/b",
	"--context", "--cluster", "--user", "--as", "--as-group", "--token", "--server", "-s", "--request-timeout", "--request-timeout=1s",
	"--insecure-skip-tls-verify", "--tls-server-name", "--disable-compression",
	"--image", "--image=", "--image=example.com/agent:v1", "--envoy-image", "--wait", "--wait=false", "--wait=maybe",
	"--timeout", "--timeout=0", "--timeout=-1s", "--timeout=1ns", "--timeout=5", "--timeout=999999h",
	"--dry-run", "--dry-run=client", "--dry-run=server", "--dry-run=none", "--dry-run=bogus",
	"-o", "-o=yaml", "-o=json", "-o=wide", "-o=table", "-o=xml", "--output", "--output=",
	"--cni-conf-dir", "--cni-conf-dir=", "--cni-conf-dir=relative", "--cni-bin-dir=/opt/cni/bin", "--no-cni-chaining",
	"--enable", "--enable=l7", "--enable=nope", "--disable", "--disable=policy",
	"--skip-node-cleanup", "--client", "--client=true",
	"-A", "--all-namespaces", "--pod", "--pod=a/b", "--pod=a/b/c", "--pod=/", "--from-pod=x", "--to-pod", "--node", "--node=n1",
	"--type", "--type=policy", "--type=lb", "--verdict", "--verdict=denied", "--verdict=drop", "--verdict=maybe",
	"--port", "--port=80", "--port=0", "--port=65536", "--port=-1", "--port=1,2,x",
	"--protocol", "--protocol=tcp", "--protocol=ICMPv6", "--protocol=GRE",
	"--since", "--since=5m", "--since=-5m", "--since=1", "--last", "--last=10", "--last=-1", "--last=99999999999999999999",
	"-f", "--follow", "-fA", "-Af", "--from", "--from=shop/frontend", "--from=shop", "--to", "--to=shop/cart", "--to=a/b/c",
	"shop/frontend", "a/b", "80", "0", "-1", "5m", "yaml", "json", "x", "--", "-", "---", "--=", "-=",
}

// fuzzArgv turns fuzz bytes into argv: tokens split at NUL; a token of
// 0x01 and one byte is vocabulary entry [byte]; anything else is itself.
// Tokens naming the kubeconfig or the discovery cache are dropped (the
// vocabulary's note says why).
func fuzzArgv(data []byte) []string {
	var argv []string
	for _, tok := range bytes.Split(data, []byte{0}) {
		s := string(tok)
		if len(tok) == 2 && tok[0] == 1 {
			s = fuzzVocab[int(tok[1])%len(fuzzVocab)]
		}
		if strings.Contains(s, "kubeconfig") || strings.Contains(s, "cache-dir") ||
			strings.Contains(s, "certificate-authority") || strings.Contains(s, "client-certificate") || strings.Contains(s, "client-key") {
			continue
		}
		argv = append(argv, s)
		if len(argv) == 24 {
			break
		}
	}
	return argv
}

// errNoNetwork is what every connection of a fuzzed run gets.
var errNoNetwork = errors.New("fuzz: no network")

// fuzzDeadline bounds one run. Every connection fails at once, so a run that
// gets near it waited on a cluster it could not reach: a hang.
const fuzzDeadline = 10 * time.Second

// FuzzArgs runs `kubectl ebpf <fuzzed argv>` in-process with every network
// connection refused (whatever --server, --context or the kubeconfig say:
// the REST config's dialer is replaced, and exec/auth plugins dropped). It
// must never panic or hang; a failure is one clear `error: ...` line (a
// message, no fmt verb garbage); and a run that tried to reach the cluster
// must fail, saying it could not reach it.
func FuzzArgs(f *testing.F) {
	dir := f.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte(`apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: "https://kebpf-fuzz.invalid:6443"}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: nobody, namespace: fuzz}
current-context: nowhere
users:
- name: nobody
  user: {token: fuzz}
`), 0o600); err != nil {
		f.Fatal(err)
	}

	for _, argv := range [][]string{
		{"version", "--client"},
		{"version", "--client", "-o", "json"},
		{"version"},
		{"install", "-o", "yaml"},
		{"install", "--dry-run=client", "--enable", "l7"},
		{"install", "--enable", "nope"},
		{"install", "--wait", "--timeout", "1s"},
		{"enable", "service-lb", "--wait"},
		{"disable", "l7", "extra"},
		{"status", "-o", "wide", "--wait", "--timeout=2s"},
		{"trace", "-A", "-f", "--verdict", "denied", "--port", "80,443"},
		{"trace", "--since", "5m", "--last", "20", "-o", "json", "--pod", "shop/frontend"},
		{"trace", "policy", "--from", "shop/frontend", "--to", "shop/cart", "--port", "8080"},
		{"trace", "policy", "--from", "shop", "--port", "0", "--protocol", "icmp"},
		{"uninstall", "--skip-node-cleanup", "--timeout", "1m"},
		{"completion", "bash"},
		{"__complete", "enable", ""},
		{"-v", "6", "status"},
		{"--server", "https://10.0.0.1", "status"},
		{"nosuch", "--nosuch"},
		{"0%!0"}, // an argv with fmt garbage of its own, echoed back
	} {
		f.Add([]byte(strings.Join(argv, "\x00")))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		argv := fuzzArgv(data)
		var dials atomic.Int32
		flags := genericclioptions.NewConfigFlags(false)
		flags.KubeConfig = &kubeconfig
		cache := filepath.Join(dir, "cache")
		flags.CacheDir = &cache
		flags.WrapConfigFn = func(c *rest.Config) *rest.Config {
			c.Dial = func(context.Context, string, string) (net.Conn, error) {
				dials.Add(1)
				return nil, errNoNetwork
			}
			c.ExecProvider, c.AuthProvider = nil, nil
			return c
		}
		var out, errOut bytes.Buffer
		streams := genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut}
		ctx, cancel := context.WithTimeout(context.Background(), fuzzDeadline)
		defer cancel()
		start := time.Now()
		code := root.Execute(ctx, root.NewCmd(flags, streams), argv, streams)
		took := time.Since(start)
		report := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("kubectl ebpf %q: exit %d after %v: "+format+"\nstdout: %q\nstderr: %q",
				append(append([]any{argv, code, took.Round(time.Millisecond)}, args...), out.String(), errOut.String())...)
		}
		if took > fuzzDeadline/2 {
			report("took most of the %v deadline with no network to wait for", fuzzDeadline)
		}
		for _, s := range []string{out.String(), errOut.String()} {
			// What argv says may be echoed (an unknown command, a bad
			// value); only what the program adds counts.
			for _, a := range argv {
				if a != "" {
					s = strings.ReplaceAll(strings.ReplaceAll(s, strconv.Quote(a), ""), a, "")
				}
			}
			for _, bad := range []string{"%!", "panic", "goroutine ", "runtime error", "<nil>"} {
				if strings.Contains(s, bad) {
					report("output contains %q", bad)
				}
			}
		}
		switch code {
		case 0, 1, 2, 3:
		default:
			report("unknown exit code")
		}
		if code != 0 {
			// Silent exits (status unhealthy, trace incomplete, policy
			// denied) print their verdict on stdout and nothing on stderr.
			// With -v, logs come first; the error is the last line.
			if errOut.Len() > 0 {
				lines := strings.Split(strings.TrimRight(errOut.String(), "\n"), "\n")
				msg, ok := strings.CutPrefix(lines[len(lines)-1], "error: ")
				if !ok || strings.TrimSpace(msg) == "" {
					report("stderr does not end with one `error: <message>` line")
				}
			} else if out.Len() == 0 {
				report("failed without saying why")
			}
		}
		if dials.Load() > 0 {
			if code == 0 {
				report("succeeded although every connection to the cluster failed")
			}
			if !strings.Contains(errOut.String(), "cannot reach cluster") {
				report("tried the cluster but the error does not say it cannot reach it")
			}
		}
	})
}
