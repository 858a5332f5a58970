//go:build linux

// Command kebpf-agent is the kubectl-ebpf node agent; see nodeagent/app.
package main

import (
	"os"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/app"
)

func main() { os.Exit(app.Main()) }
