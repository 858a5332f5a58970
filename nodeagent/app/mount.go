//go:build linux

package app

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
)

type mountOptions struct {
	bpffs      string
	cgroupRoot string
	cgroupNS   string
}

func newMountCommand(lo *logOptions, stdout, stderr io.Writer) *cobra.Command {
	o := &mountOptions{}
	cmd := &cobra.Command{
		Use:   "mount",
		Short: "Mount bpffs and cgroup2 if missing (init container; idempotent)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			log, err := lo.logger(stderr)
			if err != nil {
				return err
			}
			mounted, err := mounts.EnsureBPFFS(o.bpffs)
			if err != nil {
				return err
			}
			report(stdout, "bpffs", o.bpffs, mounted)
			log.Info("bpffs", "path", o.bpffs, "mounted", mounted)

			mounted, err = mounts.EnsureCgroup2(o.cgroupRoot, o.cgroupNS)
			if err != nil {
				return err
			}
			report(stdout, "cgroup2", o.cgroupRoot, mounted)
			log.Info("cgroup2", "path", o.cgroupRoot, "mounted", mounted, "cgroupns", o.cgroupNS)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.bpffs, "bpffs", mounts.DefaultBPFFS, "where to mount bpffs")
	f.StringVar(&o.cgroupRoot, "cgroup-root", mounts.DefaultCgroupRoot, "where to mount cgroup2")
	f.StringVar(&o.cgroupNS, "cgroupns", "",
		"cgroup namespace to mount cgroup2 from, e.g. /hostproc/1/ns/cgroup; a container's own namespace would make its cgroup the root")
	return cmd
}

func report(w io.Writer, fs, path string, mounted bool) {
	if mounted {
		fmt.Fprintf(w, "mounted %s at %s\n", fs, path)
	} else {
		fmt.Fprintf(w, "%s already mounted at %s\n", fs, path)
	}
}
