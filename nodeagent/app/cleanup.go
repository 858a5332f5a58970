//go:build linux

package app

import (
	"io"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cleanup"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
)

func newCleanupCommand(lo *logOptions, stdout, stderr io.Writer) *cobra.Command {
	opts := cleanup.Options{Out: stdout}
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Detach and unpin everything of ours; exit 0 only when nothing remains",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			log, err := lo.logger(stderr)
			if err != nil {
				return err
			}
			if err := cleanup.Run(opts); err != nil {
				return err
			}
			log.Info("cleanup complete", "pinDir", opts.PinDir, "cgroupRoot", opts.CgroupRoot)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.PinDir, "pin-dir", mounts.DefaultPinDir, "bpffs directory to remove")
	f.StringVar(&opts.CgroupRoot, "cgroup-root", mounts.DefaultCgroupRoot, "our cgroup2 mount to unmount")
	return cmd
}
