package version_test

import (
	"encoding/json"
	"testing"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/version"
	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestIntegrationVersion(t *testing.T) {
	_, flags := testutil.Cluster(t)
	check := func(wantInstalled bool) {
		t.Helper()
		r := testutil.Run(t, flags, "version", "-o", "json")
		if r.Code != 0 {
			t.Fatalf("version: %s", r)
		}
		var info version.Info
		if err := json.Unmarshal([]byte(r.Stdout), &info); err != nil {
			t.Fatal(err)
		}
		if info.Client.Version != manifests.Version {
			t.Errorf("client version %q, want %q", info.Client.Version, manifests.Version)
		}
		if info.Server == nil || info.Server.Kubernetes == "" {
			t.Fatalf("no server version: %s", r.Stdout)
		}
		if info.Server.Installed != wantInstalled {
			t.Errorf("installed = %v, want %v", info.Server.Installed, wantInstalled)
		}
		if wantInstalled && info.Server.AgentImage != testutil.Image() {
			t.Errorf("agent image %q, want %q", info.Server.AgentImage, testutil.Image())
		}
	}
	check(false)
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("install: %s", r)
	}
	check(true)
}

func TestVersionClientOnly(t *testing.T) {
	// A plain test binary has no version in its build info (testutil marks
	// it known for install's sake): the case this row prints.
	src := manifests.VersionSource
	manifests.VersionSource = manifests.SourceNone
	t.Cleanup(func() { manifests.VersionSource = src })
	// --client needs no cluster, even an unreachable one.
	r := testutil.Run(t, testutil.Flags(t, "/nonexistent/kubeconfig"), "version", "--client")
	want := "Client Version: " + manifests.Version + " (no version in the build info: built outside a git checkout or with -buildvcs=false)\n" +
		"Default Image: " + manifests.DefaultImage() + "\n"
	if r.Code != 0 || r.Stdout != want {
		t.Errorf("version --client: %s", r)
	}
}
