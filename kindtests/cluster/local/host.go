package local

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// watchedSysctls are the sysctls we, the kubelet (protect-kernel-defaults
// off), the bridge CNI plugin or kube-proxy may change; Delete restores each.
var watchedSysctls = []string{
	"net.ipv4.ip_forward", // first: writing it resets every conf/*/forwarding
	"net.bridge.bridge-nf-call-iptables",
	"net.bridge.bridge-nf-call-ip6tables",
	"net.ipv6.conf.all.forwarding",
	"net.ipv4.conf.all.route_localnet",
	"kernel.panic",
	"kernel.panic_on_oops",
	"vm.overcommit_memory",
	"vm.panic_on_oom",
	"kernel.keys.root_maxkeys",
	"kernel.keys.root_maxbytes",
	"net.netfilter.nf_conntrack_max",
	"net.netfilter.nf_conntrack_tcp_timeout_established",
	"net.netfilter.nf_conntrack_tcp_timeout_close_wait",
	"net.netfilter.nf_conntrack_udp_timeout",
	"net.netfilter.nf_conntrack_udp_timeout_stream",
}

type sysctl struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// hostRecord is what the host looked like before Create touched it.
type hostRecord struct {
	Sysctls []sysctl `json:"sysctls"`
	// Absent are host paths the kubelet, CNI or ip create at fixed places
	// that did not exist before; teardown removes them.
	Absent []string `json:"absent"`
	// PrivateMounts were not shared before Create made / rshared.
	PrivateMounts []string `json:"privateMounts"`
	// NodeMounts existed under nodeMountDirs before Create.
	NodeMounts []string `json:"nodeMounts"`
}

// fixedPaths are created outside the state dir whatever flags we pass
// (the kubelet's device-plugin socket dir is a compiled-in path).
var fixedPaths = []string{
	"/var/lib/kubelet", "/usr/libexec/kubernetes", "/var/lib/cni", "/var/log/containers",
	"/var/log/pods", "/run/netns", "/run/mount", "/run/containerd", "/etc/kubernetes", "/run/kubernetes", "/etc/cni", "/opt/cni",
	"/run/kubectl-ebpf",
}

func sysctlPath(key string) string {
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
}

func readSysctl(key string) (string, bool) {
	b, err := os.ReadFile(sysctlPath(key))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

func writeSysctl(key, value string) error {
	if err := os.WriteFile(sysctlPath(key), []byte(value+"\n"), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

func (s *state) recordFile() string { return s.path("host-record.json") }

func (s *state) recordHost() error {
	if _, err := os.Stat(s.recordFile()); err == nil {
		return nil
	}
	var rec hostRecord
	keys := append([]string(nil), watchedSysctls...)
	// Writing ip_forward flips forwarding on every interface; remember each.
	if ents, err := os.ReadDir("/proc/sys/net/ipv4/conf"); err == nil {
		for _, e := range ents {
			if e.Name() == Bridge || strings.HasPrefix(e.Name(), "veth") || strings.Contains(e.Name(), ".") {
				continue
			}
			keys = append(keys, "net.ipv4.conf."+e.Name()+".forwarding")
		}
	}
	for _, k := range keys {
		if v, ok := readSysctl(k); ok {
			rec.Sysctls = append(rec.Sysctls, sysctl{k, v})
		}
	}
	if err := rec.recordMounts(); err != nil {
		return err
	}
	for _, p := range fixedPaths {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			rec.Absent = append(rec.Absent, p)
		}
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	if err := os.WriteFile(s.recordFile(), b, 0o644); err != nil {
		return fmt.Errorf("record host state: %w", err)
	}
	return nil
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	return runEnv(ctx, nil, name, args...)
}

// runEnv is run with extra environment variables.
func runEnv(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// containmentRules keep pods and nodes on this machine: nothing enters or
// leaves the node network except to the host itself (which is INPUT/OUTPUT,
// not FORWARD). Node-to-node traffic is bridged (in and out on the bridge).
func (s *state) containmentRules() [][]string {
	comment := "kubectl-ebpf-local:" + s.name
	var rules [][]string
	for _, table := range []string{"filter", "mangle"} {
		rules = append(rules,
			[]string{"-t", table, "FORWARD", "-i", Bridge, "!", "-o", Bridge, "-m", "comment", "--comment", comment, "-j", "DROP"},
			[]string{"-t", table, "FORWARD", "-o", Bridge, "!", "-i", Bridge, "-m", "comment", "--comment", comment, "-j", "DROP"},
		)
	}
	return rules
}

func ruleArgs(op string, r []string) []string {
	// r = -t table CHAIN spec...
	return append([]string{"-w", r[0], r[1], op, r[2]}, r[3:]...)
}

// setupNetwork creates the node network on the host: the bridge every node
// hangs off, with the API server's address, and the containment rules. The
// host's own forwarding and mount propagation stay as they were: nodes
// forward inside their own netns and share mounts inside their own mount
// namespace.
func (s *state) setupNetwork(ctx context.Context) error {
	if !linkExists(Bridge) {
		if _, err := run(ctx, "ip", "link", "add", Bridge, "type", "bridge"); err != nil {
			return err
		}
	}
	// The API server binds this address, so it must exist before it starts.
	if _, err := run(ctx, "ip", "addr", "replace", APIServerIP+"/24", "dev", Bridge); err != nil {
		return err
	}
	if _, err := run(ctx, "ip", "link", "set", Bridge, "up"); err != nil {
		return err
	}
	for _, r := range s.containmentRules() {
		if _, err := run(ctx, "iptables", ruleArgs("-C", r)...); err == nil {
			continue
		}
		insert := append([]string{"-w", r[0], r[1], "-I", r[2], "1"}, r[3:]...)
		if _, err := run(ctx, "iptables", insert...); err != nil {
			return err
		}
	}
	return nil
}

// restoreSysctls puts back the values recorded before Create.
func (s *state) restoreSysctls() []error {
	b, err := os.ReadFile(s.recordFile())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return []error{fmt.Errorf("read host record: %w", err)}
	}
	var rec hostRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return []error{fmt.Errorf("parse host record: %w", err)}
	}
	var errs []error
	for _, sc := range rec.Sysctls {
		cur, ok := readSysctl(sc.Key)
		if !ok || cur == sc.Value {
			continue
		}
		if err := writeSysctl(sc.Key, sc.Value); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func (s *state) readRecord() (hostRecord, bool) {
	var rec hostRecord
	b, err := os.ReadFile(s.recordFile())
	if err != nil {
		return rec, false
	}
	return rec, json.Unmarshal(b, &rec) == nil
}
