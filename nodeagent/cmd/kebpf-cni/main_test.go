package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBinary builds the plugin as it ships (static, CGO_ENABLED=0) and runs
// it as a runtime would: a CNI error on stdout and exit 1 when it must
// refuse a sandbox, exit 0 for DEL whatever the agent's state.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the plugin binary (-short)")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "kebpf-cni")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	marker := filepath.Join(dir, "kebpf_np_ep")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	conf := `{"cniVersion":"1.0.0","name":"kebpf","type":"kebpf-cni","socket":"` + filepath.Join(dir, "gone.sock") +
		`","enforcedMarker":"` + marker + `","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.0.7/24"}]}}`
	runCNI := func(cmd string) (string, error) {
		c := exec.Command(bin)
		c.Env = []string{"CNI_COMMAND=" + cmd, "CNI_CONTAINERID=abc", "CNI_NETNS=/var/run/netns/cni-x", "CNI_IFNAME=eth0",
			"CNI_PATH=/opt/cni/bin", "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"}
		c.Stdin = strings.NewReader(conf)
		out, err := c.Output()
		return string(out), err
	}

	out, err := runCNI("ADD")
	if exit, ok := err.(*exec.ExitError); !ok || exit.ExitCode() != 1 {
		t.Fatalf("ADD with the agent gone and enforcement loaded: %v, want exit 1\n%s", err, out)
	}
	var cniErr struct {
		Code uint   `json:"code"`
		Msg  string `json:"msg"`
	}
	if err := json.Unmarshal([]byte(out), &cniErr); err != nil || cniErr.Code != 11 || !strings.Contains(cniErr.Msg, "unprotected") {
		t.Errorf("ADD printed %q (%v), want a CNI error with code 11 (try again later)", out, err)
	}
	if out, err := runCNI("DEL"); err != nil {
		t.Errorf("DEL with the agent gone: %v\n%s", err, out)
	}
}
