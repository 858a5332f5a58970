// Package e2e is the end-to-end suite: the product installed through the real
// `kubectl ebpf` plugin mechanism on a real cluster, with every claim about the
// nodes proven on the nodes. The same tests run against either provider.
//
// The suite runs only when asked: `make e2e` (which brings the cluster up and
// names it in KEBPF_CLUSTER), or KEBPF_E2E=1 (cluster.EnvCreateInTests) to let
// the suite bring up and remove a cluster of its own. A plain `go test ./...` never creates a
// cluster: only one fits on a host, and a stray one collides with it.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/cluster"
	"github.com/kubectl-ebpf/kubectl-ebpf/kindtests/testenv"
)

// envCluster names the recorded cluster `make e2e` brought up.
const envCluster = "KEBPF_CLUSTER"

// env is the environment every test of this package runs against.
var env *testenv.Env

// skipReason is why no test of this package can run; empty when env is set.
var skipReason string

// requireEnv skips a test when the suite was not asked for (see the package
// comment) and fails it when the suite was asked for without root.
func requireEnv(t *testing.T) {
	t.Helper()
	if env == nil {
		t.Skip(skipReason)
	}
	if os.Geteuid() != 0 {
		t.Fatal("e2e needs root (this machine and CI run as root)")
	}
}

func TestMain(m *testing.M) {
	flag.Parse()
	name := os.Getenv(envCluster)
	switch {
	case testing.Short():
		skipReason = "e2e: skipped under -short (needs root and a local cluster: run make e2e)"
	case name == "":
		if ok, why := cluster.CreateInTests(); !ok {
			skipReason = "e2e: skipped: needs a local cluster, which it " + why
		}
	}
	if skipReason != "" {
		fmt.Println(skipReason)
		os.Exit(m.Run())
	}
	own := false
	var err error
	if name != "" {
		env, err = testenv.Load(name)
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s=%s but no environment is recorded: %v\n", envCluster, name, err)
			os.Exit(1)
		}
	} else {
		name, own = cluster.DefaultName+"-e2e", true
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		env, err = testenv.Up(ctx, testenv.Options{Name: name, KubeProxy: true, Nodes: 2, Log: os.Stderr})
		cancel()
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e: bring up the cluster:", err)
			testenv.Down(context.Background(), name, "", os.Stderr)
			os.Exit(1)
		}
	}
	code := m.Run()
	if own {
		if err := testenv.Down(context.Background(), name, "", os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: tear down:", err)
			code = 1
		}
	}
	os.Exit(code)
}
