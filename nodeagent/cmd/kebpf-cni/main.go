// Command kebpf-cni is the chained CNI plugin that makes a new pod wait for
// its NetworkPolicy: see package nodeagent/cni. The agent copies it into
// the node's CNI bin dir; the container runtime runs it, never a user.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
)

func main() {
	p := &cni.Plugin{Env: cni.EnvFromOS(), Stdin: os.Stdin, Out: os.Stdout}
	if err := p.Run(context.Background()); err != nil {
		cni.WriteError(os.Stdout, err)
		fmt.Fprintln(os.Stderr, "kebpf-cni:", err)
		os.Exit(1)
	}
}
