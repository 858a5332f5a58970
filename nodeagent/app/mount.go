//go:build linux

package app

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/sysctl"
)

type mountOptions struct {
	bpffs      string
	cgroupRoot string
	cgroupNS   string
	procSys    string
	stateDir   string
}

func newMountCommand(lo *logOptions, stdout, stderr io.Writer) *cobra.Command {
	o := &mountOptions{}
	cmd := &cobra.Command{
		Use:   "mount",
		Short: "Mount bpffs and cgroup2 if missing, set the node's sysctls the datapath relies on (init container; idempotent)",
		Long: "Mounts bpffs and cgroup2 where they are missing and sets net.ipv4.tcp_migrate_req=1 in the node's " +
			"network namespace: when a node's Envoy is replaced, the new one shares the listener with the old one " +
			"(SO_REUSEPORT) and the connections queued on the old one's listeners as they close move to the new one " +
			"instead of being reset. The value it had before is kept in the state dir; `kebpf-agent cleanup` " +
			"(uninstall) puts it back. A kernel without the parameter (before 5.14) or a read-only /proc/sys is " +
			"reported, not fatal.",
		Args: cobra.NoArgs,
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

			prev, changed, err := sysctl.EnsureRecorded(o.procSys, sysctl.TCPMigrateReq, "1", sysctlRecords(o.stateDir))
			switch {
			case err != nil:
				// Only the instant an Envoy's listeners close during its
				// replacement depends on it: said, not fatal.
				fmt.Fprintf(stdout, "warning: %v (connections queued on a closing Envoy listener are reset)\n", err)
				log.Warn("sysctl", "name", sysctl.TCPMigrateReq, "err", err)
			case changed:
				fmt.Fprintf(stdout, "set %s to 1 (was %s)\n", sysctl.TCPMigrateReq, prev)
				log.Info("sysctl", "name", sysctl.TCPMigrateReq, "value", "1", "was", prev)
			default:
				fmt.Fprintf(stdout, "%s already 1\n", sysctl.TCPMigrateReq)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.bpffs, "bpffs", mounts.DefaultBPFFS, "where to mount bpffs")
	f.StringVar(&o.cgroupRoot, "cgroup-root", mounts.DefaultCgroupRoot, "where to mount cgroup2")
	f.StringVar(&o.stateDir, "state-dir", defaultStateDir, "the agent's state dir, where the sysctls' earlier values are kept for cleanup")
	f.StringVar(&o.procSys, "proc-sys", sysctl.DefaultProcSys, "the kernel parameters of the node's network namespace (this container runs in it)")
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

// sysctlRecords is where, in the state dir, the sysctls' values from
// before our change are kept.
func sysctlRecords(stateDir string) string { return filepath.Join(stateDir, "sysctl") }
