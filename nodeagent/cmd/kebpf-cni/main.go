// Command kebpf-cni is the chained CNI plugin that makes a new pod wait for
// its NetworkPolicy: see package nodeagent/cni. The agent copies it into
// the node's CNI bin dir; the container runtime runs it, never a user.
package main

import "github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"

func main() { cni.Main() }
