//go:build linux

package app

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netpol"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cleanup"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/cni"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/mounts"
	"github.com/kubectl-ebpf/kubectl-ebpf/nodeagent/sysctl"
)

func newCleanupCommand(lo *logOptions, stdout, stderr io.Writer) *cobra.Command {
	opts := cleanup.Options{Out: stdout}
	var cniConfDir, cniBinDir, stateDir, procSys string
	var unchain cni.DirsList
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Detach and unpin everything of ours; exit 0 only when nothing remains",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			log, err := lo.logger(stderr)
			if err != nil {
				return err
			}
			var errs []error
			// Unchain first: from here on new pods no longer wait for an
			// agent that is gone.
			if cniConfDir != "" {
				unchain = append(unchain, cni.Dirs{Conf: cniConfDir, Bin: cniBinDir})
			}
			for _, d := range unchain {
				done, err := cni.Remove(d.Conf, d.Bin)
				for _, line := range done {
					fmt.Fprintln(stdout, line)
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("unchain kebpf-cni from %s: %w", d, err))
				}
			}
			// clsact filters are not pinned; they hold our programs until
			// removed by name. That name scan is per node already: it
			// lists the qdiscs of this process's network namespace, the
			// node's (nodes sharing a kernel have one each), where the
			// host side of this node's pod veths lives.
			if err := netpol.DetachClsactFilters(); err != nil {
				errs = append(errs, fmt.Errorf("clsact filters: %w", err))
			}
			// Only this node's objects: the kernel may be shared with other
			// nodes (kind), whose agents name theirs kebpf_ too.
			if err := cleanup.Run(opts); err != nil {
				errs = append(errs, err)
			}
			if stateDir != "" {
				// The node's sysctls as they were before the first
				// agent's init container changed them (nodeagent/sysctl).
				restored, err := sysctl.Restore(procSys, sysctlRecords(stateDir))
				for _, line := range restored {
					fmt.Fprintln(stdout, line)
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("sysctls: %w", err))
				}
				if err := os.RemoveAll(stateDir); err != nil {
					errs = append(errs, fmt.Errorf("state dir: %w", err))
				}
			}
			if err := errors.Join(errs...); err != nil {
				return err
			}
			log.Info("cleanup complete", "pinDir", opts.PinDir, "cgroupRoot", opts.CgroupRoot)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.PinDir, "pin-dir", mounts.DefaultPinDir, "bpffs directory to remove; its pins also say which kernel objects are this node's")
	f.StringVar(&opts.CgroupRoot, "cgroup-root", mounts.DefaultCgroupRoot, "our cgroup2 mount to unmount; kebpf_ programs attached at its cgroup are this node's")
	f.StringVar(&stateDir, "state-dir", defaultStateDir, "the agent's state dir to remove (empty: leave it)")
	f.StringVar(&procSys, "proc-sys", sysctl.DefaultProcSys, "the kernel parameters of the node's network namespace, restored from the state dir's records")
	f.StringVar(&cniConfDir, "cni-conf-dir", "", "CNI config dir to take kebpf-cni out of (empty: leave CNI config alone)")
	f.StringVar(&cniBinDir, "cni-bin-dir", "", "CNI plugin dir to delete kebpf-cni from")
	f.Var(&unchain, "cni-unchain", "CONF_DIR:BIN_DIR to take kebpf-cni out of (repeatable; one side may be empty)")
	return cmd
}
