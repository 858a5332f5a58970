package status_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/testutil"
)

func TestIntegrationStatusNotInstalled(t *testing.T) {
	_, flags := testutil.Cluster(t)
	r := testutil.Run(t, flags, "status")
	if r.Code == 0 {
		t.Fatalf("status before install succeeded: %s", r)
	}
	if line := testutil.OneLine(t, r.Stderr); line != `error: not installed: run "kubectl ebpf install"` {
		t.Errorf("stderr = %q", line)
	}

	r = testutil.Run(t, flags, "status", "-o", "json")
	if r.Code == 0 {
		t.Fatalf("status -o json before install succeeded: %s", r)
	}
	var got struct {
		Installed *bool `json:"installed"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &got); err != nil || got.Installed == nil || *got.Installed {
		t.Errorf("want {installed: false}, got %q (%v)", r.Stdout, err)
	}
}

func TestIntegrationStatusJSONShape(t *testing.T) {
	kc, flags := testutil.Cluster(t)
	if r := testutil.Run(t, flags, "install", "--image", testutil.Image()); r.Code != 0 {
		t.Fatalf("install: %s", r)
	}
	// Agents need not be ready (that is the e2e suite's job), so the exit code
	// may be 1; the shape must hold either way.
	r := testutil.Run(t, flags, "status", "-o", "json")
	if r.Code != 0 && r.Code != 1 {
		t.Fatalf("status -o json: %s", r)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(r.Stdout), &got); err != nil {
		t.Fatalf("status -o json is not JSON: %v\n%s", err, r.Stdout)
	}
	if got["installed"] != true {
		t.Errorf("installed = %v", got["installed"])
	}
	ds, ok := got["daemonSet"].(map[string]any)
	if !ok {
		t.Fatalf("daemonSet missing: %v", got)
	}
	for _, k := range []string{"name", "image", "desired", "ready", "updated"} {
		if _, ok := ds[k]; !ok {
			t.Errorf("daemonSet.%s missing", k)
		}
	}
	if ds["image"] != testutil.Image() {
		t.Errorf("daemonSet.image = %v, want %s", ds["image"], testutil.Image())
	}
	nodes, ok := got["nodes"].([]any)
	if !ok {
		t.Fatalf("nodes is not a list: %v", got["nodes"])
	}
	cluster, err := testutil.Clients(t, kc).Kube.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != len(cluster.Items) {
		t.Errorf("%d node rows for %d nodes", len(nodes), len(cluster.Items))
	}
	for _, n := range nodes {
		row := n.(map[string]any)
		for _, k := range []string{"name", "ready", "version", "kernel", "features", "active", "errors", "pod"} {
			if _, ok := row[k]; !ok {
				t.Errorf("node row lacks %q: %v", k, row)
			}
		}
		if row["ready"] == false && len(row["errors"].([]any)) == 0 {
			t.Errorf("node %v not ready without a reason", row["name"])
		}
	}

	r = testutil.Run(t, flags, "status")
	if !strings.HasPrefix(r.Stdout, "NODE") {
		t.Errorf("table output: %q", r.Stdout)
	}
	if r.Code != 0 && r.Stderr != "" {
		t.Errorf("unhealthy status printed an error besides the table: %q", r.Stderr)
	}
}
