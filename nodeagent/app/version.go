//go:build linux

package app

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/manifests"
)

func newVersionCommand(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the agent version",
		Args:  cobra.NoArgs,
		Run: func(*cobra.Command, []string) {
			if manifests.GitCommit != "" {
				fmt.Fprintf(stdout, "kebpf-agent %s (%s)\n", manifests.Version, manifests.GitCommit)
				return
			}
			fmt.Fprintf(stdout, "kebpf-agent %s\n", manifests.Version)
		},
	}
}
