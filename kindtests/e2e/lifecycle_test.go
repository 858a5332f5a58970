package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

// result is one finished command.
type result struct {
	stdout, stderr string
	code           int
}

// kubectl runs the kubectl built from the pinned Kubernetes module with the
// env's bin dir first on PATH, so `kubectl ebpf ...` resolves our plugin
// through kubectl's own plugin lookup.
func kubectl(t *testing.T, timeout time.Duration, args ...string) result {
	t.Helper()
	return runKubectl(t, timeout, true, args...)
}

func runKubectl(t *testing.T, timeout time.Duration, logIt bool, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(env.BinDir, "kubectl"), args...)
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+env.Cluster.Kubeconfig,
		"PATH="+env.BinDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
	}
	if logIt {
		t.Logf("$ kubectl %s  (exit %d)\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

func mustKubectl(t *testing.T, timeout time.Duration, args ...string) string {
	t.Helper()
	r := kubectl(t, timeout, args...)
	if r.code != 0 {
		t.Fatalf("kubectl %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// onNode runs a command on a node through the provider (the host itself for
// the local provider, the node container for kind).
func onNode(t *testing.T, node string, argv ...string) (string, error) {
	t.Helper()
	p, err := env.ProviderOf()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := p.Exec(ctx, env.Name, node, argv...)
	return string(out), err
}

// migrateReq is the node's net.ipv4.tcp_migrate_req.
func migrateReq(t *testing.T, node string) string {
	t.Helper()
	out, err := onNode(t, node, "cat", "/proc/sys/net/ipv4/tcp_migrate_req")
	if err != nil {
		t.Fatalf("node %s: read net.ipv4.tcp_migrate_req: %v %s", node, err, out)
	}
	return strings.TrimSpace(out)
}

// nodeBPF is what a node shows of our BPF state, read with tools that are not
// ours (ls, bpftool).
type nodeBPF struct {
	pinDir   bool     // /sys/fs/bpf/kubectl-ebpf exists
	programs []string // loaded programs named kebpf_*
	attached []string // cgroup attachments of kebpf_* programs
}

// The nodes' CNI dirs: the install defaults, which both providers use.
const (
	cniConfDir = manifests.DefaultCNIConfDir
	cniBinDir  = manifests.DefaultCNIBinDir
)

// cniChained reports whether a CNI config of the node carries kebpf-cni and
// whether its binary is installed.
func cniChained(t *testing.T, node string) (entry, binary bool) {
	t.Helper()
	_, err := onNode(t, node, "sh", "-c", `grep -qs '"kebpf-cni"' `+cniConfDir+`/*`)
	entry = err == nil
	_, err = onNode(t, node, "test", "-x", cniBinDir+"/kebpf-cni")
	return entry, err == nil
}

// waitCNIChained waits until every node's CNI config and bin dir carry
// kebpf-cni (want) or neither does, failing after timeout.
func waitCNIChained(t *testing.T, want bool, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, node := range env.Cluster.Nodes {
		for {
			entry, bin := cniChained(t, node)
			if entry == want && bin == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %s after %s: kebpf-cni in %s %v, binary in %s %v; want %v", node, timeout, cniConfDir, entry, cniBinDir, bin, want)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
}

func inspectNode(t *testing.T, node string) nodeBPF {
	t.Helper()
	var s nodeBPF
	if _, err := onNode(t, node, "test", "-e", "/sys/fs/bpf/kubectl-ebpf"); err == nil {
		s.pinDir = true
	}
	out, err := onNode(t, node, "bpftool", "-j", "prog", "show")
	if err != nil {
		t.Fatalf("bpftool prog show on %s: %v: %s", node, err, out)
	}
	var progs []struct {
		Name string `json:"name"`
	}
	mustJSON(t, "bpftool prog show on "+node, out, &progs)
	for _, p := range progs {
		if strings.HasPrefix(p.Name, "kebpf_") {
			s.programs = append(s.programs, p.Name)
		}
	}
	out, err = onNode(t, node, "bpftool", "cgroup", "tree")
	if err != nil {
		t.Fatalf("bpftool cgroup tree on %s: %v: %s", node, err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "kebpf_") {
			s.attached = append(s.attached, strings.Join(strings.Fields(line), " "))
		}
	}
	return s
}

// grepKebpf keeps the bpftool paragraphs (one object each) that mention
// kebpf_, for a failure message.
func grepKebpf(out string) string {
	var keep []string
	var cur []string
	flush := func() {
		if strings.Contains(strings.Join(cur, "\n"), "kebpf_") {
			keep = append(keep, cur...)
		}
		cur = nil
	}
	for _, l := range strings.Split(out, "\n") {
		if l != "" && l[0] != ' ' && l[0] != '\t' {
			flush()
		}
		cur = append(cur, l)
	}
	flush()
	return strings.Join(keep, "\n")
}

// statusJSON is the part of `kubectl ebpf status -o json` the suite checks.
type statusJSON struct {
	Installed bool `json:"installed"`
	Nodes     []struct {
		Name    string   `json:"name"`
		Ready   bool     `json:"ready"`
		Version string   `json:"version"`
		Kernel  string   `json:"kernel"`
		Active  []string `json:"active"`
		Errors  []string `json:"errors"`
	} `json:"nodes"`
}

func status(t *testing.T) (statusJSON, result) {
	t.Helper()
	r := kubectl(t, time.Minute, "ebpf", "status", "-o", "json")
	var s statusJSON
	mustJSON(t, "kubectl ebpf status -o json", r.stdout, &s)
	return s, r
}

func ensureUninstalled(t *testing.T) {
	t.Helper()
	if r := kubectl(t, 5*time.Minute, "ebpf", "uninstall", "--wait"); r.code != 0 {
		t.Errorf("cleanup uninstall: exit %d: %s", r.code, r.stderr)
	}
}

// TestIntegrationLifecycle is the foundation's acceptance test: install and
// wait, every node Ready in status, the datapath present on each node and kept
// across an agent restart, then uninstall and proof on each node that nothing
// of ours remains.
func TestIntegrationLifecycle(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() { ensureUninstalled(t) })

	if out := mustKubectl(t, time.Minute, "plugin", "list"); !strings.Contains(out, "kubectl-ebpf") {
		t.Fatalf("kubectl plugin list does not find kubectl-ebpf:\n%s", out)
	}
	mustKubectl(t, time.Minute, "ebpf", "version")
	// kubectl completes plugin arguments through kubectl_complete-ebpf.
	if out := mustKubectl(t, time.Minute, "__complete", "ebpf", ""); !strings.Contains(out, "install") || !strings.Contains(out, "uninstall") {
		t.Errorf("kubectl completion of `kubectl ebpf` lacks the plugin's commands:\n%s", out)
	}

	t.Run("status before install", func(t *testing.T) {
		r := kubectl(t, time.Minute, "ebpf", "status")
		if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "not installed") {
			t.Fatalf("status before install: want non-zero exit and 'not installed', got exit %d", r.code)
		}
	})

	migrateBefore := map[string]string{}
	for _, node := range env.Cluster.Nodes {
		migrateBefore[node] = migrateReq(t, node)
	}
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")

	s, r := status(t)
	if r.code != 0 || !s.Installed || len(s.Nodes) != len(env.Cluster.Nodes) {
		t.Fatalf("status after install: exit %d, installed %v, %d nodes (cluster has %d)", r.code, s.Installed, len(s.Nodes), len(env.Cluster.Nodes))
	}
	for _, n := range s.Nodes {
		if !n.Ready || n.Version != env.Product.Version || !slices.Contains(n.Active, "sockstats") || len(n.Errors) > 0 {
			t.Errorf("node %s: ready %v version %q (want %q) active %v errors %v", n.Name, n.Ready, n.Version, env.Product.Version, n.Active, n.Errors)
		}
	}

	for _, node := range env.Cluster.Nodes {
		st := inspectNode(t, node)
		if !st.pinDir || !slices.Contains(st.programs, "kebpf_sockstat") || len(st.attached) == 0 {
			t.Fatalf("node %s after install: pin dir %v, programs %v, attached %v", node, st.pinDir, st.programs, st.attached)
		}
		// The policy feature (on by default) chained kebpf-cni.
		if entry, bin := cniChained(t, node); !entry || !bin {
			t.Errorf("node %s after install: kebpf-cni in %s %v, binary in %s %v", node, cniConfDir, entry, cniBinDir, bin)
		}
		// The init container hands a closing Envoy listener's queued
		// connections to its replacement (nodeagent/sysctl).
		if v := migrateReq(t, node); v != "1" {
			t.Errorf("node %s after install: net.ipv4.tcp_migrate_req = %q, want 1", node, v)
		}
		// The agent's metrics answer on the node's loopback only.
		out, err := onNode(t, node, "curl", "-sf", "http://127.0.0.1:9890/metrics")
		if err != nil || !strings.Contains(out, "kebpf_sockets_created_total") {
			t.Errorf("metrics on %s: %v\n%.400s", node, err, out)
		}
	}

	t.Run("second install is a no-op", func(t *testing.T) {
		mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	})

	t.Run("agent restart keeps the datapath", func(t *testing.T) {
		before := map[string]nodeBPF{}
		for _, node := range env.Cluster.Nodes {
			before[node] = inspectNode(t, node)
		}
		mustKubectl(t, 2*time.Minute, "-n", "kubectl-ebpf-system", "delete", "pod", "-l", "app.kubernetes.io/name=kebpf-agent", "--wait=true")
		// With the agents gone, the pinned links keep the programs attached.
		for _, node := range env.Cluster.Nodes {
			if st := inspectNode(t, node); len(st.attached) != len(before[node].attached) {
				t.Errorf("node %s without agent: attached %v, before %v", node, st.attached, before[node].attached)
			}
		}
		mustKubectl(t, 6*time.Minute, "ebpf", "status", "--wait", "--timeout", "5m")
		for _, node := range env.Cluster.Nodes {
			if st := inspectNode(t, node); len(st.attached) != len(before[node].attached) {
				t.Errorf("node %s after restart: attached %v, before %v (re-attach must update the pinned link, not add one)", node, st.attached, before[node].attached)
			}
		}
	})

	t.Run("switching CNI chaining off unchains, on again chains", func(t *testing.T) {
		mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--no-cni-chaining", "--wait", "--timeout", "5m")
		waitCNIChained(t, false, 30*time.Second)
		mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
		waitCNIChained(t, true, 30*time.Second)
	})

	// The last install does not chain, so its DaemonSet mounts no CNI dir:
	// uninstall must still clean where an earlier install chained.
	mustKubectl(t, 2*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--no-cni-chaining")
	mustKubectl(t, 6*time.Minute, "ebpf", "uninstall", "--wait")

	for _, node := range env.Cluster.Nodes {
		if v := migrateReq(t, node); v != migrateBefore[node] {
			t.Errorf("node %s after uninstall: net.ipv4.tcp_migrate_req = %q, want %q as before install", node, v, migrateBefore[node])
		}
		// Programs are freed by the kernel after their last reference goes
		// (RCU, deferred work such as a pod netns's teardown): a program
		// still listed a moment later is a leak only if it stays.
		st := inspectNode(t, node)
		for deadline := time.Now().Add(15 * time.Second); len(st.programs) > 0 && time.Now().Before(deadline); {
			time.Sleep(500 * time.Millisecond)
			st = inspectNode(t, node)
		}
		if st.pinDir || len(st.programs) > 0 || len(st.attached) > 0 {
			progs, _ := onNode(t, node, "bpftool", "prog", "show")
			links, _ := onNode(t, node, "bpftool", "link", "show")
			t.Errorf("node %s after uninstall: pin dir %v, programs %v, attached %v\nbpftool prog show:\n%s\nbpftool link show:\n%s",
				node, st.pinDir, st.programs, st.attached, grepKebpf(progs), grepKebpf(links))
		}
		if entry, bin := cniChained(t, node); entry || bin {
			t.Errorf("node %s after uninstall: kebpf-cni still in %s %v, binary in %s %v", node, cniConfDir, entry, cniBinDir, bin)
		}
	}
	if r := kubectl(t, time.Minute, "get", "namespace", "kubectl-ebpf-system"); r.code == 0 {
		t.Errorf("namespace kubectl-ebpf-system still exists after uninstall --wait")
	}
	if r := kubectl(t, time.Minute, "get", "crd", "nodestates.kubectl-ebpf.io"); r.code == 0 {
		t.Errorf("CRD nodestates.kubectl-ebpf.io still exists after uninstall --wait")
	}
	r = kubectl(t, time.Minute, "ebpf", "status")
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "not installed") {
		t.Errorf("status after uninstall: want 'not installed' and non-zero exit, got %d", r.code)
	}
	if r := kubectl(t, time.Minute, "ebpf", "uninstall"); r.code != 0 || !strings.Contains(r.stdout+r.stderr, "nothing to uninstall") {
		t.Errorf("second uninstall: want exit 0 and 'nothing to uninstall', got %d", r.code)
	}
}

// badImage exists in no registry and on no node.
const badImage = "localhost/kubectl-ebpf/agent:does-not-exist"

// TestIntegrationInstallBadImage: `install --image` with an image that
// exists nowhere never leaves a node unable to start pods. On a first
// install and on an upgrade the image check stops it before anything
// changes (naming every node and the pull error); the installed agents
// keep running and both nodes keep starting pods. With
// --skip-image-check the rollout happens and --wait ends at --timeout with
// one clear line.
func TestIntegrationInstallBadImage(t *testing.T) {
	requireEnv(t)
	t.Cleanup(func() {
		kubectl(t, 2*time.Minute, "delete", "namespace", badImageNamespace, "--wait=true", "--ignore-not-found")
		ensureUninstalled(t)
	})
	ensureUninstalled(t)
	badInstall := func(what string, args ...string) string {
		t.Helper()
		start := time.Now()
		r := kubectl(t, 3*time.Minute, append([]string{"ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--image", badImage}, args...)...)
		if r.code == 0 {
			t.Fatalf("%s: install with an image that exists nowhere succeeded:\n%s", what, r.stdout)
		}
		msg := strings.TrimSpace(r.stderr)
		t.Logf("%s: refused in %s: %s", what, time.Since(start).Round(100*time.Millisecond), msg)
		return msg
	}
	// First install: nothing applied, not even the namespace the check ran in.
	msg := badInstall("first install")
	if !strings.HasPrefix(msg, "error: image check failed, nothing was changed") || !strings.Contains(msg, "Image") {
		t.Errorf("want 'error: image check failed, nothing was changed...' with the pull error, got:\n%s", msg)
	}
	for _, node := range env.Cluster.Nodes {
		if !strings.Contains(msg, "node "+node+":") {
			t.Errorf("the error does not name node %s", node)
		}
	}
	// Deleted by install (namespace deletion itself finishes asynchronously).
	if r := kubectl(t, 2*time.Minute, "wait", "--for=delete", "namespace/"+manifests.Namespace, "--timeout=60s"); r.code != 0 {
		t.Errorf("namespace %s left after the failed first install: %s", manifests.Namespace, r.stderr)
	}
	podsStartOnEveryNode(t, "fresh")

	// Upgrade: the installed agents stay, untouched, and keep admitting pods.
	mustKubectl(t, 6*time.Minute, "ebpf", "install", "--envoy-image", env.Product.EnvoyRef, "--wait", "--timeout", "5m")
	before := mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.AgentSelector,
		"-o", "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].restartCount}{'\\n'}{end}")
	waitCNIChained(t, true, time.Minute)
	msg = badInstall("upgrade")
	if !strings.Contains(msg, "image check failed, nothing was changed") {
		t.Errorf("upgrade to a bad image: want the image check's refusal, got:\n%s", msg)
	}
	image := mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "daemonset", manifests.DaemonSetName,
		"-o", "jsonpath={.spec.template.spec.containers[0].image}")
	if image != env.Product.AgentRef {
		t.Errorf("DaemonSet image after the refused upgrade: %s, want %s", image, env.Product.AgentRef)
	}
	after := mustKubectl(t, time.Minute, "-n", manifests.Namespace, "get", "pods", "-l", manifests.AgentSelector,
		"-o", "jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].restartCount}{'\\n'}{end}")
	if before != after {
		t.Errorf("agent pods changed across the refused upgrade:\nbefore %s\nafter  %s", before, after)
	}
	podsStartOnEveryNode(t, "upgrade")
	ensureUninstalled(t)

	// --skip-image-check on a first install: nothing is chained before an
	// agent runs, so nodes keep starting pods; --wait says why it timed out.
	msg = badInstall("skip-image-check", "--skip-image-check", "--wait", "--timeout", "40s")
	if !strings.HasPrefix(msg, "error: ") || !strings.Contains(msg, env.Cluster.Nodes[0]) || !strings.Contains(msg, "Image") {
		t.Errorf("want one 'error: ...' line naming node %s and the image problem, got:\n%s", env.Cluster.Nodes[0], msg)
	}
	podsStartOnEveryNode(t, "skipped")
}

const badImageNamespace = "kebpf-badimage"

// podsStartOnEveryNode starts a pod on each node and fails unless all are
// Ready within a minute (a node whose kebpf-cni refuses sandboxes fails it).
func podsStartOnEveryNode(t *testing.T, tag string) {
	t.Helper()
	var w strings.Builder
	fmt.Fprintf(&w, "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", badImageNamespace)
	for i, node := range env.Cluster.Nodes {
		w.WriteString(serverPod{name: fmt.Sprintf("%s-%d", tag, i), ns: badImageNamespace, node: node,
			args: "serve, --tcp, '80', --udp, '', --http, '0'", labels: "app: " + tag}.yaml())
	}
	kubectlStdin(t, w.String(), "apply", "-f", "-")
	r := kubectl(t, 2*time.Minute, "-n", badImageNamespace, "wait", "--for=condition=Ready", "pod", "-l", "app="+tag, "--timeout=60s")
	if r.code != 0 {
		desc := kubectl(t, time.Minute, "-n", badImageNamespace, "describe", "pods", "-l", "app="+tag)
		t.Fatalf("%s: new pods did not start within a minute on every node:\n%s\n%s", tag, r.stderr, desc.stdout)
	}
}
