//go:build linux

package bench

import (
	"os/exec"
	"runtime"
	"strings"
	"testing"
)

// The report's metadata comes from the machine, not from a template.
func TestRunMetadata(t *testing.T) {
	uname, err := exec.Command("uname", "-r").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := kernelRelease(); got != strings.TrimSpace(string(uname)) {
		t.Errorf("kernel %q, uname -r says %q", got, uname)
	}
	if m := cpuModel(); m == "" || (runtime.GOARCH == "amd64" && m == "unknown") {
		t.Errorf("cpu model %q", m)
	}
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse (the tests run in a checkout): %v", err)
	}
	if rev := revision(); !strings.HasPrefix(rev, strings.TrimSpace(string(head))) {
		t.Errorf("revision %q, git says %s", rev, head)
	}
	if v := toolVersion("go", "version"); !strings.HasPrefix(v, "go version go") {
		t.Errorf("go version: %q", v)
	}
	if v := toolVersion("/nonexistent/kube-proxy", "--version"); !strings.HasPrefix(v, "unknown (") {
		t.Errorf("missing binary: %q", v)
	}
}
