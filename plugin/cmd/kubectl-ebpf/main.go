// Command kubectl-ebpf is the kubectl plugin (`kubectl ebpf ...`).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/kubectl-ebpf/kubectl-ebpf/plugin/pkg/cmd/root"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	streams := genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr}
	code := root.Execute(ctx, root.NewCmd(nil, streams), os.Args[1:], streams)
	stop()
	os.Exit(code)
}
