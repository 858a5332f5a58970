// Package e2e is the end-to-end suite: the product installed through the real
// `kubectl ebpf` plugin mechanism on a real cluster, with every claim about the
// nodes proven on the nodes. The same tests run against either provider.
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

// env is the environment every test of this package runs against.
var env *testenv.Env

// TestMain uses the cluster `make e2e` brought up (KEBPF_CLUSTER names its
// record); run bare, it brings one up itself and removes it afterwards.
func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("e2e: skipped under -short (needs root and a local cluster)")
		os.Exit(m.Run())
	}
	name := os.Getenv("KEBPF_CLUSTER")
	own := false
	var err error
	if name != "" {
		env, err = testenv.Load(name)
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: KEBPF_CLUSTER=%s but no environment is recorded: %v\n", name, err)
			os.Exit(1)
		}
	} else {
		name, own = cluster.DefaultName+"-e2e", true
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		env, err = testenv.Up(ctx, testenv.Options{Name: name, KubeProxy: true, Log: os.Stderr})
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
